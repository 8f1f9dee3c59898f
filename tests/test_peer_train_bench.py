"""benchmarks/peer_train.py: compsae's trainer against SAELens' and sparsify's on the same rows."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

_ROOT = Path(__file__).resolve().parents[1]
_PATH = _ROOT / "benchmarks" / "peer_train.py"
_spec = importlib.util.spec_from_file_location("peer_train", _PATH)
assert _spec is not None and _spec.loader is not None
peer_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_train)


def _results(out: str) -> dict[str, float]:
    return {
        line[len("RESULT ") :].split("=")[0]: float(line.split("=")[1])
        for line in out.splitlines()
        if line.startswith("RESULT ")
    }


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, str(_PATH), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=_ROOT,
    )


def test_fvu_is_zero_for_exact_and_one_for_the_mean() -> None:
    x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    assert peer_train.fvu(x, x) == 0.0
    assert peer_train.fvu(x, np.broadcast_to(x.mean(0), x.shape)) == pytest.approx(1.0)
    assert peer_train.fvu(x, np.zeros_like(x)) > 1.0  # the offset from 0 counts as error


def test_training_order_is_every_row_once_per_epoch_and_seeded() -> None:
    order = peer_train.training_order(100, 250)
    assert len(order) == 250
    assert sorted(order[:100]) == list(range(100))
    assert sorted(order[100:200]) == list(range(100))
    assert (order == peer_train.training_order(100, 250)).all()
    assert not (order[:100] == np.arange(100)).all()  # shuffled


def test_synthetic_rows_are_scaled_and_structured() -> None:
    x = peer_train.synthetic_rows(4096, chunk=1000).astype(np.float32)
    assert x.shape == (4096, peer_train.D)
    assert np.linalg.norm(x, axis=1).mean() == pytest.approx(math.sqrt(peer_train.D), rel=0.01)
    # sparse sums of a few directions: far fewer directions carry the variance than noise needs
    centred = x - x.mean(0)
    spectrum = np.linalg.svd(centred, compute_uv=False) ** 2
    assert spectrum[:50].sum() / spectrum.sum() > 1.5 * 50 / peer_train.D
    assert (peer_train.synthetic_rows(64) == peer_train.synthetic_rows(64)).all()


def test_shared_init_is_compsaes_first_draw() -> None:
    import torch

    from compsae.train.config import make_model_config
    from compsae.train.models import build_model

    w = peer_train.shared_init(64)
    assert w.shape == (64, peer_train.D)
    assert torch.allclose(w.norm(dim=1), torch.ones(64), atol=1e-5)
    torch.manual_seed(0)  # what run_train does before it builds a model of training seed 0
    model = build_model(make_model_config(type="topk", n_latents=64, k=32, aux_k=0), peer_train.D)
    assert torch.equal(w, model.W_dec.detach())
    assert torch.equal(model.W_enc.detach(), w.T)  # the encoder starts as the transpose


def test_a_skipped_tool_reports_nan_and_why(capsys: pytest.CaptureFixture[str]) -> None:
    ok = {"ok": True, "tokens": 1000, "wall_s": 10.0, "loop_s": 5.0, "fvu": 0.25}
    runs = {64: {"compsae": [ok, {**ok, "wall_s": 5.0}], "saelens": [ok], "sparsify": []}}
    peer_train.report(runs, {"sparsify": "sparsify is not installed"}, [64])
    out = capsys.readouterr().out
    assert "SKIP sparsify: sparsify is not installed" in out
    got = _results(out)
    assert got["compsae_train_vs_saelens"] == pytest.approx(2.0)  # best of the rounds
    assert got["compsae_fvu"] == pytest.approx(0.25)
    assert math.isnan(got["compsae_train_vs_sparsify"]) and math.isnan(got["sparsify_fvu"])
    assert got["compsae_train_loop_vs_saelens_n64"] == pytest.approx(1.0)


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or __import__("torch").cuda.is_available(),
    reason="the no-CUDA path needs a machine without CUDA",
)
def test_cuda_without_a_device_skips_every_tool() -> None:
    proc = _run("--quick", "--device", "cuda", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("SKIP ") == 3
    got = _results(proc.stdout)
    assert set(got) >= {"compsae_train_vs_saelens", "compsae_train_vs_sparsify", "compsae_fvu"}
    assert all(math.isnan(v) for v in got.values())


@pytest.mark.slow
def test_quick_run_trains_all_three() -> None:
    missing = [m for m in ("sae_lens", "sparsify") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e '.[peers]')")
    proc = _run("--quick", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "SKIP" not in proc.stdout and "FAILED" not in proc.stdout, proc.stdout
    got = _results(proc.stdout)
    for tool in ("compsae", "saelens", "sparsify"):
        # a trained SAE explains part of the variance; an untrained or broken one would not
        assert 0.0 < got[f"{tool}_fvu"] < 0.95, got
    for peer in ("saelens", "sparsify"):
        assert got[f"compsae_train_vs_{peer}"] > 0
