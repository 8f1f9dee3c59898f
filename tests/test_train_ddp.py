"""Data-parallel training (DistributedDataParallel over gloo, 2 CPU processes) matches training in
one process on the same global batches; only rank 0 writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from train_fixtures import HOOK, make_store, model_cfg

from compsae.train.config import TrainStageConfig
from compsae.train.distributed import DistContext, is_rank0
from compsae.train.run import run_train

SMALL = {"n_latents": 64, "k": 4, "d_f": 16, "d_c": 8, "n_heads": 4, "aux_k": 16}


def _cfg() -> TrainStageConfig:
    # batch 49 splits 25 + 24, and the ~920 training rows end an epoch with a smaller batch;
    # and, with dead_window_tokens small, AuxK on a dead mask that changes during training.
    return TrainStageConfig(
        hook=HOOK,
        batch_size=49,
        tokens=49 * 24,
        log_every=6,
        checkpoint_every=12,
        device="cpu",
        lr=1e-3,
        heldout_fraction=0.1,
        mix_chunks=4,
        dead_window_tokens=100,
        num_threads=1,
        models={
            "comp": model_cfg("compsae", **SMALL),
            "topk": model_cfg("topk", **SMALL),
            "relu": model_cfg("relu", **SMALL, l1_coef=0.05),
        },
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world: int, port: int, store_url: str, out_dir: str, result_dir: str
) -> None:
    # what torchrun sets for every process it starts
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    out = run_train(_cfg(), store_url, out_dir, progress=False)
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(out, sort_keys=True))


def test_local_rows_split_a_batch_in_order():
    for n in (1, 7, 50, 64):
        for world in (1, 2, 3):
            parts = [DistContext(r, world).local_rows(n) for r in range(world)]
            assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n))
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1
    assert is_rank0()


def test_two_processes_match_one_process(tmp_path):
    store, _ = make_store(str(tmp_path / "s.zarr"), n=1024)
    torch.set_num_threads(1)
    single = run_train(_cfg(), store.url, str(tmp_path / "single"), progress=False)

    results = tmp_path / "results"
    results.mkdir()
    mp.start_processes(
        _worker,
        args=(2, _free_port(), store.url, str(tmp_path / "ddp"), str(results)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )

    rank0 = json.loads((results / "rank0.json").read_text())
    assert (
        json.loads((results / "rank1.json").read_text()) == rank0
    )  # every rank returns rank 0's outputs
    for name in ("comp", "topk", "relu"):
        a = load_file(tmp_path / "single" / name / "model.safetensors")
        b = load_file(tmp_path / "ddp" / name / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
        # rank 0 alone wrote the metrics: one line per logging step, equal to the single-process
        # ones
        lines = [
            json.loads(ln)
            for ln in (tmp_path / "ddp" / name / "metrics.jsonl").read_text().splitlines()
        ]
        ref = [
            json.loads(ln)
            for ln in (tmp_path / "single" / name / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in lines] == [r["step"] for r in ref] == list(range(6, 25, 6))
        for got, want in zip(lines, ref, strict=True):
            assert (got["k"], got["m"], got["tokens"], got["lr"]) == (
                want["k"],
                want["m"],
                want["tokens"],
                want["lr"],
            )
            for key in ("loss", "fvu", "l0", "dead_fraction"):
                assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), (
                    name,
                    got["step"],
                    key,
                )
        assert rank0["models"][name]["heldout"]["fvu"] == pytest.approx(
            single["models"][name]["heldout"]["fvu"], rel=1e-3
        )
    assert rank0["models"]["topk"]["step"] == 24 and rank0["models"]["topk"]["finished"]
    # the AuxK dead mask was in play (dead latents existed at some logged step)
    assert any(
        json.loads(ln)["dead_fraction"] > 0
        for ln in (tmp_path / "ddp" / "topk" / "metrics.jsonl").read_text().splitlines()
    )


_TORCHRUN_SCRIPT = """
import json, os, sys
from compsae.train.config import TrainStageConfig
from compsae.train.run import run_train
cfg = TrainStageConfig.model_validate_json(sys.argv[1])
out = run_train(cfg, sys.argv[2], sys.argv[3], progress=False)
with open(os.path.join(sys.argv[4], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(out, f, sort_keys=True)
"""


def torchrun(cfg: TrainStageConfig, store_url: str, tmp_path: Path, timeout: float) -> None:
    """`torchrun --nproc-per-node 2` around run_train into `tmp_path/ddp` (each rank's metrics in
    `tmp_path/rank<N>.json`)."""
    script = tmp_path / "train.py"
    script.write_text(_TORCHRUN_SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        str(script),
        cfg.model_dump_json(),
        store_url,
        str(tmp_path / "ddp"),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_torchrun_launch(tmp_path):
    """The real launcher: `torchrun --nproc-per-node 2` (env:// rendezvous, gloo) around
    run_train."""
    store, _ = make_store(str(tmp_path / "s.zarr"), n=1024)
    cfg = _cfg().model_copy(update={"models": {"topk": model_cfg("topk", **SMALL)}})
    torchrun(cfg, store.url, tmp_path, timeout=300)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert json.loads((tmp_path / "rank1.json").read_text()) == rank0
    torch.set_num_threads(1)
    run_train(cfg, store.url, str(tmp_path / "single"), progress=False)
    a = load_file(tmp_path / "single" / "topk" / "model.safetensors")
    b = load_file(tmp_path / "ddp" / "topk" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
