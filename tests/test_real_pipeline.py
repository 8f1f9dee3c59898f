"""The `real` pipeline's design (three layers in one harvest, the middle one trained, TopK at
equal n, k and at CompSAE's parameter count) and its tiny twin run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compsae.pipeline.config import load_pipeline
from compsae.train.config import make_model_config
from compsae.train.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _n_params(spec: dict, d: int) -> int:
    return sum(p.numel() for p in build_model(make_model_config(**spec), d).parameters())


@pytest.mark.parametrize(("name", "d_model"), [("real", 576), ("real_tiny", 64)])
def test_real_design(name, d_model):
    _, cfg = load_pipeline(name, ROOT / "pipelines.yaml")
    hooks = cfg.harvest.hooks
    assert len(hooks) == 3 and cfg.train.hook == hooks[1]
    models = cfg.train.models
    comp, topk, wide = (dict(models[m]) for m in ("compsae", "topk", "topk_params"))
    # a second seed of the same CompSAE, for the seed stability of its pairs
    seed1 = dict(models["compsae__s1"])
    # the PolySAE-form baseline: the quadratic term with its diagonal, at CompSAE's n, k and rank
    poly = dict(models["polysae"])
    assert poly["pair_diagonal"] and (poly["n_latents"], poly["k"], poly["pair_rank"]) == (
        comp["n_latents"],
        comp["k"],
        comp["pair_rank"],
    )
    assert dict(seed1.pop("train")) == {"seed": 1}
    assert seed1 == {k: v for k, v in comp.items() if k != "train"}
    assert (comp["n_latents"], comp["k"]) == (topk["n_latents"], topk["k"]) and wide["k"] == comp[
        "k"
    ]
    # the widened TopK is within one latent's parameters of CompSAE
    per_latent = _n_params(topk, d_model) / topk["n_latents"]
    assert abs(_n_params(wide, d_model) - _n_params(comp, d_model)) <= per_latent
    if name == "real":
        assert cfg.harvest.n_tokens >= 2_000_000
    assert cfg.analyze.pair_causal


def test_real_tiny_runs_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    args = [
        "run",
        "--pipeline",
        "real_tiny",
        "--config",
        str(ROOT / "pipelines.yaml"),
        "--set",
        f"runs_root={tmp_path / 'runs'}",
        "--set",
        "harvest.n_tokens=2048",
        "--set",
        "train.tokens=4096",
        "--set",
        "analyze.baselines=[pca]",
    ]
    res = subprocess.run(
        [sys.executable, "-m", "compsae.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    analyze = next((tmp_path / "runs" / "real_tiny").glob("analyze-*"))
    metrics = json.loads((analyze / "metrics.json").read_text())
    assert set(metrics["models"]) >= {"compsae", "compsae__s1", "topk", "topk_params", "polysae"}
    causal = metrics["models"]["compsae"]["pair_causal"]
    assert {r["kind"] for r in causal} == {"top", "matched", "random_dir"}
    top = [r for r in causal if r["kind"] == "top"]
    assert top[0]["n_pairs"] >= 1 and top[0]["n_tokens"] > 0
    assert (analyze / "figures" / "pair_causal_compsae.png").is_file()
    (stab,) = metrics["pair_stability"]
    assert stab["variant"] == "compsae" and stab["models"] == ["compsae", "compsae__s1"]
    assert 0.0 <= stab["effect_overlap"] <= 1.0 and 0.0 <= stab["pmi_overlap"] <= 1.0
    assert -1.0 <= stab["median_cos"] <= 1.0
