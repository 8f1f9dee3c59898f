"""The probe stage on a real (tiny-neox) harvest and checkpoints made here: it runs end to end,
probes.md shows the numbers of probes.json, and the SAEs see activations as they did in training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compsae.errors import UserError
from compsae.evaluation.probes.config import ProbeConfig
from compsae.evaluation.probes.stage import (
    fmt,
    lm_computes,
    load_trained,
    probed_tasks,
    run_probe,
    sae_outputs,
)
from compsae.evaluation.probes.tasks import ANSWER_TASKS, TASKS
from compsae.harvest.config import HarvestConfig
from compsae.harvest.run import run_harvest
from compsae.store.split import HeldOutSplit
from compsae.train.checkpoint import save_checkpoint
from compsae.train.config import make_model_config
from compsae.train.models import build_model
from compsae.train.records import CheckpointMeta, Normalization

HOOK = "blocks.1.hook_resid_post"
D = 64  # tiny-neox width
MODELS = {
    "compsae": make_model_config(type="compsae", n_latents=64, k=4, d_f=16, d_c=8, n_heads=2),
    "compsae_none": make_model_config(type="compsae", n_latents=64, k=4, composer="none"),
    "topk": make_model_config(type="topk", n_latents=64, k=4),
    "relu": make_model_config(type="relu", n_latents=64),
}
SCALE = 3.0


def make_models(train_dir: str) -> None:
    torch.manual_seed(0)
    for name, cfg in MODELS.items():
        meta = CheckpointMeta(
            type=cfg.type,
            model=cfg,
            d_in=D,
            hook=HOOK,
            normalization=Normalization(scale=SCALE),
            split=HeldOutSplit(fraction=0.1),
            step=1,
            tokens_seen=1,
            finished=True,
        )
        save_checkpoint(f"{train_dir}/{name}", build_model(cfg, D), meta.model_dump(mode="json"))


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("probe")
    harvest = HarvestConfig(
        model="tiny-neox",
        hooks=[HOOK],
        context=32,
        n_tokens=1024,
        batch_size=8,
        chunk_rows=128,
        shard_rows=512,
        device="cpu",
        data={"source": "synthetic:mixed", "seed": 1},
    )
    store = run_harvest(harvest, str(root / "harvest"))["store"]
    make_models(str(root / "train"))
    cfg = ProbeConfig(
        n_items=80, pca_components=8, nmf_components=8, fit_rows=512, device="cpu", batch_size=40
    )
    out = run_probe(cfg, store, str(root / "train"), str(root / "probe"))
    report = json.loads((root / "probe" / "probes.json").read_text())
    md = (root / "probe" / "probes.md").read_text()
    return {"root": root, "store": store, "out": out, "report": report, "md": md, "cfg": cfg}


def test_stage_runs_end_to_end(probed):
    out, report, root = probed["out"], probed["report"], probed["root"]
    assert sorted(out["files"]) == sorted(
        str(root / "probe" / f) for f in ("probes.json", "probes.md", "probes.png")
    )
    assert (root / "probe" / "probes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["headline"] == report["headline"]
    assert report["hook"] == HOOK and report["lm"] == "tiny-neox"
    # the pairwise CompSAE is probed twice: its codes, and its codes plus its pair terms
    assert report["methods"] == [*sorted(MODELS), "compsae+pairs", "pca", "nmf", "raw"]
    assert set(report["behaviour"]) == {"arithmetic", "boolean", "grammar"}
    for b in report["behaviour"].values():
        assert b["n"] == 80 and 0.0 <= b["accuracy"] <= 1.0
    # every probed (family, task) has every method at every k; numbers are held-out rates
    keys = {(r["family"], r["task"], r["method"], r["k"]) for r in report["probes"]}
    assert len(keys) == len(report["probes"])
    for family, tasks in report["tasks"].items():
        for task in tasks:
            for method in report["methods"]:
                for k in (1, 2, 5):
                    assert (family, task, method, k) in keys or task == "distractor_plural"
    assert all(
        0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["majority"] <= 1.0 for r in report["probes"]
    )
    # the conjunction test runs for the CompSAE with a composition path only
    assert {r["model"] for r in report["conjunctions"]} == {"compsae"}
    assert {r["family"] for r in report["conjunctions"]} == {"arithmetic", "boolean", "grammar"}


def test_answer_tasks_follow_the_lm(probed):
    report = probed["report"]
    for family, b in report["behaviour"].items():
        probed_answers = {
            r["task"] for r in report["probes"] if r["family"] == family and r["kind"] == "answer"
        }
        assert probed_answers == (set(ANSWER_TASKS[family]) if b["computes"] else set())


def _md_section(md: str, title: str) -> list[list[str]]:
    """The data rows (cells) of the first table after heading `title`."""
    table: list[str] = []
    for line in md.split(title, 1)[1].splitlines()[1:]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]


def test_markdown_shows_the_json_numbers(probed):
    report, md = probed["report"], probed["md"]
    per_task = _md_section(md, "## Per task")
    assert per_task == [
        [
            r["family"],
            r["task"],
            r["kind"],
            r["method"],
            str(r["k"]),
            fmt(r["accuracy"]),
            fmt(r["f1"]),
            fmt(r["majority"]),
        ]
        for r in report["probes"]
    ]
    behaviour = _md_section(md, "## LM behaviour")
    assert [row[:2] for row in behaviour] == [
        [f, fmt(b["accuracy"])] for f, b in report["behaviour"].items()
    ]
    summary = {(s["family"], s["method"], s["k"]): s for s in report["summary"]}
    for family in report["config"]["families"]:
        for row in _md_section(md, f"### {family} ("):
            method = row[0]
            assert row[1:4] == [fmt(summary[family, method, k]["accuracy"]) for k in (1, 2, 5)]
            assert row[4:7] == [fmt(summary[family, method, k]["f1"]) for k in (1, 2, 5)]
    conj = _md_section(md, "## Conjunction test")
    done = [r for r in report["conjunctions"] if "skipped" not in r]
    assert [row[-1] for row in conj] == [fmt(r["gain_over_control"]) for r in done]


def test_summary_is_the_mean_over_tasks(probed):
    report = probed["report"]
    for s in report["summary"]:
        sel = [
            r["accuracy"]
            for r in report["probes"]
            if (r["family"], r["method"], r["k"]) == (s["family"], s["method"], s["k"])
        ]
        assert s["n_tasks"] == len(sel) and s["accuracy"] == pytest.approx(np.mean(sel))


def test_saes_see_activations_scaled_as_in_training(probed):
    saes = {s.name: s for s in load_trained(str(probed["root"] / "train"), torch.device("cpu"))}
    assert set(saes) == set(MODELS)
    x = np.random.default_rng(0).normal(size=(5, D)).astype(np.float32)
    for s in saes.values():
        assert s.scale == SCALE
        with torch.no_grad():
            expected = s.model(torch.from_numpy(x) * SCALE)
        got = sae_outputs(s, x)
        np.testing.assert_allclose(got["z"], expected.z.numpy(), rtol=1e-5, atol=1e-6)
        if s.has_composition:  # comp + linear = the full reconstruction
            np.testing.assert_allclose(
                got["comp"] + got["linear"], expected.x_hat.numpy(), rtol=1e-5, atol=1e-5
            )
    assert saes["compsae"].has_composition and not saes["compsae_none"].has_composition


def test_answer_policy_and_significance():
    assert lm_computes({"accuracy": 0.9, "n": 400}, 0.01)[1]
    assert not lm_computes({"accuracy": 0.52, "n": 400}, 0.01)[1]
    families = ["arithmetic", "boolean"]
    auto = probed_tasks(families, {"arithmetic": True, "boolean": False}, "auto")
    assert auto["arithmetic"] == list(TASKS["arithmetic"])
    assert auto["boolean"] == [t for t in TASKS["boolean"] if t != "value"]
    assert probed_tasks(families, {"arithmetic": False, "boolean": False}, "always")[
        "boolean"
    ] == list(TASKS["boolean"])
    assert (
        "result_even"
        not in probed_tasks(families, {"arithmetic": True, "boolean": True}, "never")["arithmetic"]
    )


def test_missing_train_dir_is_a_user_error(probed, tmp_path):
    with pytest.raises(UserError, match="no train stage folder"):
        run_probe(probed["cfg"], probed["store"], str(tmp_path / "nope"), str(tmp_path / "out"))
