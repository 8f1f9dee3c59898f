"""Training: FVU falls on synthetic data, exact kill-and-resume, NaN stops, checkpoints, bad
input."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import HOOK, make_store, model_cfg, sparse_mixture

from compsae.errors import UserError
from compsae.train.checkpoint import load_model
from compsae.train.config import TrainConfig, TrainStageConfig, make_model_config
from compsae.train.models import build_model
from compsae.train.records import CheckpointMeta
from compsae.train.run import run_train
from compsae.train.schedules import k_at, l1_scale_at, lr_at, m_at
from compsae.train.trainer import Trainer

SMALL = {"n_latents": 64, "k": 4, "d_f": 16, "d_c": 8, "n_heads": 4, "aux_k": 16}


def _fvu(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        x_hat = model(x).x_hat
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.mark.parametrize("kind", ["compsae", "pair", "topk", "relu"])
def test_training_lowers_fvu_on_known_directions(tmp_path, kind):
    x, _ = sparse_mixture(8192, d=16, seed=1)
    data = torch.from_numpy(x)
    held = data[-512:]
    extra = {"composer": "pair", "pair_l1": 0.1} if kind == "pair" else {}
    mcfg = model_cfg("compsae" if kind == "pair" else kind, **SMALL, **extra, l1_coef=0.02)
    tcfg = TrainConfig(
        lr=3e-3,
        batch_size=128,
        tokens=128 * 250,
        log_every=50,
        checkpoint_every=1000,
        device="cpu",
        warmup_fraction=0.02,
    )
    torch.manual_seed(0)
    model = build_model(mcfg, 16)
    model.init_b_dec(data[:512])
    start = _fvu(model, held)
    trainer = Trainer(
        model,
        mcfg,
        tcfg,
        str(tmp_path / kind),
        CheckpointMeta.start(mcfg, 16, config_hash="x"),
        progress=False,
    )
    batches = (data[i % 60 * 128 : (i % 60 + 1) * 128] for i in range(10**6))
    last = trainer.fit(batches)
    end = _fvu(model, held)
    assert end < 0.35 * start and end < 0.35, (start, end)
    assert last["step"] == 250 and last["k"] in (4, None) and np.isfinite(last["fvu"])
    lines = (tmp_path / kind / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and {
        "loss",
        "mse",
        "fvu",
        "l0",
        "dead_fraction",
        "lr",
        "tokens_per_s",
    } <= set(json.loads(lines[0]))


def _stage(**over) -> TrainStageConfig:
    base = {
        "hook": HOOK,
        "batch_size": 64,
        "tokens": 64 * 30,
        "log_every": 5,
        "checkpoint_every": 10,
        "device": "cpu",
        "lr": 1e-3,
        "heldout_fraction": 0.1,
        "mix_chunks": 4,
        "models": {"comp": model_cfg("compsae", **SMALL), "topk": model_cfg("topk", **SMALL)},
    }
    return TrainStageConfig(**{**base, **over})


def test_kill_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    store, _ = make_store(str(tmp_path / "s.zarr"), n=1536)
    cfg = _stage()
    ref = run_train(cfg, store.url, str(tmp_path / "ref"), progress=False)

    real_step = Trainer._train_step

    def dying_step(self, *args):
        if self.step == 23:
            raise KeyboardInterrupt  # the process is killed between checkpoints
        return real_step(self, *args)

    monkeypatch.setattr(Trainer, "_train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, store.url, str(tmp_path / "run"), progress=False)
    meta = json.loads((tmp_path / "run" / "comp" / "config.json").read_text())
    assert meta["step"] == 20 and meta["finished"] is False
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    out = run_train(cfg, store.url, str(tmp_path / "run"), progress=False)

    for name in ("comp", "topk"):
        a = load_file(tmp_path / "ref" / name / "model.safetensors")
        b = load_file(tmp_path / "run" / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        steps = [
            json.loads(ln)["step"]
            for ln in (tmp_path / "run" / name / "metrics.jsonl").read_text().splitlines()
        ]
        assert steps == [5, 10, 15, 20, 25, 30]
    assert out["digest"] == ref["digest"]
    assert out["models"]["comp"]["heldout"]["fvu"] == pytest.approx(
        ref["models"]["comp"]["heldout"]["fvu"]
    )
    # a finished run is reused, not retrained
    again = run_train(cfg, store.url, str(tmp_path / "run"), progress=False)
    assert again["digest"] == ref["digest"] and again["models"]["topk"]["step"] == 30


def _poisoned_run(tmp_path, n_batches: int, bad_batch: int, value: float, **train: int):
    """A TopK trainer on `n_batches` random batches of 32 rows, one of which holds `value`."""
    mcfg = model_cfg("topk", **SMALL)
    tcfg = TrainConfig(batch_size=32, tokens=32 * n_batches, device="cpu", **train)
    trainer = Trainer(
        build_model(mcfg, 16),
        mcfg,
        tcfg,
        str(tmp_path / "m"),
        CheckpointMeta.start(mcfg, 16, config_hash="x"),
        progress=False,
    )

    def batches():
        for i in range(n_batches):
            x = torch.randn(32, 16)
            if i == bad_batch:
                x[0, 0] = value
            yield x

    return trainer, batches()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    trainer, batches = _poisoned_run(tmp_path, 20, 7, float("inf"), checkpoint_every=5)
    with pytest.raises(UserError, match="at step 8.*checkpoint \\(step 5\\)"):
        trainer.fit(batches)
    _, meta = load_model(str(tmp_path / "m"))
    assert meta["step"] == 5 and meta["finished"] is False


def test_a_non_finite_loss_is_noted_on_the_device_and_read_at_the_next_check(tmp_path):
    """No host read per step: the first bad step is kept on the device and raised at the next log
    step or checkpoint, here the last step's, before the final checkpoint is written."""
    from compsae.train.device_values import FirstNonFinite

    first = FirstNonFinite("cpu")
    first.note(torch.tensor(1.5), 1)
    assert first.read() is None
    first.note(torch.tensor(float("inf")), 3)
    first.note(torch.tensor(float("nan")), 5)
    assert first.read() == (3, float("inf"))

    trainer, batches = _poisoned_run(
        tmp_path, 6, 3, float("nan"), checkpoint_every=100, log_every=100
    )
    with pytest.raises(UserError, match="loss is nan at step 4; no checkpoint was written yet"):
        trainer.fit(batches)
    assert trainer.step == 6 and not (tmp_path / "m" / "config.json").exists()


def test_load_model_refuses_pickle(tmp_path):
    store, _ = make_store(str(tmp_path / "s.zarr"), n=512)
    run_train(_stage(tokens=64 * 3), store.url, str(tmp_path / "t"), progress=False)
    folder = tmp_path / "t" / "topk"
    model, meta = load_model(str(folder))
    assert meta["finished"] and model.k == SMALL["k"] and meta["normalization"]["scale"] > 0
    (folder / "model.safetensors").write_bytes(pickle.dumps({"W_dec": np.zeros(3)}))
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_model(str(folder))


def test_force_never_deletes_a_file_compsae_did_not_write(tmp_path):
    store, _ = make_store(str(tmp_path / "s.zarr"), n=512)
    out = str(tmp_path / "t")
    run_train(_stage(tokens=64 * 2), store.url, out, progress=False)
    mine = tmp_path / "t" / "comp" / "notes.txt"
    mine.write_text("my notes")
    before = (tmp_path / "t" / "comp" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"did not write \(notes.txt\).*move it out"):
        run_train(_stage(tokens=64 * 2, lr=1e-2), store.url, out, force=True, progress=False)
    assert mine.read_text() == "my notes"
    assert (tmp_path / "t" / "comp" / "model.safetensors").read_bytes() == before
    mine.unlink()
    assert run_train(_stage(tokens=64 * 2, lr=1e-2), store.url, out, force=True, progress=False)[
        "models"
    ]["comp"]["finished"]


def test_bad_input_is_one_line_and_leaves_no_complete_checkpoint(tmp_path):
    store, _ = make_store(str(tmp_path / "s.zarr"), n=512)
    with pytest.raises(UserError, match="not 'blocks.9.x'"):
        run_train(_stage(hook="blocks.9.x"), store.url, str(tmp_path / "a"), progress=False)
    with pytest.raises(UserError, match="batch_size 1024 is larger"):
        run_train(_stage(batch_size=1024), store.url, str(tmp_path / "b"), progress=False)
    with pytest.raises(UserError, match="no store"):
        run_train(_stage(), str(tmp_path / "missing.zarr"), str(tmp_path / "c"), progress=False)
    # a checkpoint of another config is refused unless force
    run_train(_stage(tokens=64 * 2), store.url, str(tmp_path / "d"), progress=False)
    with pytest.raises(UserError, match="another config.*--force"):
        run_train(_stage(tokens=64 * 2, lr=1e-2), store.url, str(tmp_path / "d"), progress=False)
    out = run_train(
        _stage(tokens=64 * 2, lr=1e-2), store.url, str(tmp_path / "d"), force=True, progress=False
    )
    assert out["models"]["comp"]["finished"]
    # a corrupt shard stops training with its name; nothing claims to be finished
    with open(f"{store.path}/acts/{HOOK}/c/1/0", "r+b") as f:
        f.seek(64)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(UserError, match="shard 1"):
        run_train(
            _stage(tokens=64 * 30), str(tmp_path / "s.zarr"), str(tmp_path / "e"), progress=False
        )
    for cfg_file in (tmp_path / "e").rglob("config.json"):
        assert json.loads(cfg_file.read_text())["finished"] is False


def test_schedules():
    m = make_model_config(
        k=8, n_latents=64, k_anneal_fraction=0.5, curriculum_m=[2, 3, 4], curriculum_at=[0.2, 0.4]
    )
    assert (
        k_at(0, 100, m) == 32
        and k_at(25, 100, m) == 20
        and k_at(50, 100, m) == 8
        and k_at(99, 100, m) == 8
    )
    assert [m_at(s, 100, m) for s in (0, 19, 20, 39, 40, 99)] == [2, 2, 3, 3, 4, 4]
    assert m_at(0, 100, m.model_copy(update={"curriculum": False})) is None
    assert k_at(0, 100, m.model_copy(update={"graduated_sparsity": False})) == 8
    t = TrainConfig(lr=1.0, warmup_fraction=0.1, decay_fraction=0.2)
    assert lr_at(0, 100, t) == pytest.approx(0.1) and lr_at(50, 100, t) == 1.0
    assert lr_at(90, 100, t) == pytest.approx(0.5) and lr_at(99, 100, t) == pytest.approx(0.05)
    r = make_model_config(type="relu", l1_warmup_fraction=0.1)
    assert l1_scale_at(0, 100, r) == pytest.approx(0.1) and l1_scale_at(50, 100, r) == 1.0


def test_models_trained_in_parallel_processes_match_one_at_a_time(tmp_path):
    store, _ = make_store(str(tmp_path / "store"))
    cfg = _stage(seeds=[0, 1])
    one = run_train(cfg, store.url, str(tmp_path / "one"), progress=False)
    two = run_train(cfg, store.url, str(tmp_path / "two"), progress=False, workers=2)
    assert (
        set(one["models"]) == set(two["models"]) == {"comp__s0", "comp__s1", "topk__s0", "topk__s1"}
    )
    for name in one["models"]:
        a = load_file(str(tmp_path / "one" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "two" / name / "model.safetensors"))
        for key in a:  # thread counts differ between the two runs: equal up to float reordering
            torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
        assert two["models"][name]["step"] == one["models"][name]["step"] == 30
