"""Training curves: every model of a train stage on one figure, from the trainers' metrics.jsonl."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_fixtures import HOOK, make_store, model_cfg

from compsae.train.config import TrainStageConfig, make_model_config
from compsae.train.curves import CURVES_FILE, final_values, plot_training_curves, read_metrics_log
from compsae.train.run import run_train

SMALL = {"n_latents": 32, "k": 4, "d_f": 8, "d_c": 4, "n_heads": 2, "aux_k": 8}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curves")
    store, _ = make_store(str(tmp / "s.zarr"), n=1024)
    cfg = TrainStageConfig(
        hook=HOOK,
        batch_size=64,
        tokens=64 * 12,
        log_every=3,
        checkpoint_every=100,
        device="cpu",
        lr=1e-3,
        heldout_fraction=0.1,
        mix_chunks=4,
        models={
            "comp": model_cfg("compsae", **SMALL),
            "topk": model_cfg("topk", **SMALL),
            "relu": make_model_config(type="relu", n_latents=32),
        },
    )
    out = run_train(cfg, store.url, str(tmp / "train"), progress=False)
    return tmp, out


def test_train_stage_draws_every_model_on_one_figure(trained):
    tmp, out = trained
    assert out["curves"] == CURVES_FILE
    png = (tmp / "train" / CURVES_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    logs = {n: read_metrics_log(str(tmp / "train" / n)) for n in ("comp", "topk", "relu")}
    assert all(len(df) == 4 for df in logs.values())  # steps 3, 6, 9, 12
    assert list(logs["topk"]["tokens"]) == [192, 384, 576, 768]
    panels = plot_training_curves(logs, str(tmp / "again.png"))
    assert panels[:4] == ["fvu", "l0", "dead_fraction", "loss"]
    assert {"recon", "auxk", "l1", "comp_share"} <= set(panels)
    # composition share only where a composition path exists, and defined as in analysis
    comp = logs["comp"]
    expected = (comp["fvu_no_comp"] - comp["fvu"]) / (1 - comp["fvu"])
    np.testing.assert_allclose(comp["comp_share"], expected)
    assert "comp_share" not in logs["topk"]


def test_a_line_cut_by_a_kill_is_skipped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "tokens": 10, "fvu": 0.5})
        + "\n"
        + json.dumps({"step": 2, "tokens": 20, "fvu": 0.4})
        + "\n"
        + '{"step": 3, "tok'
    )
    df = read_metrics_log(str(tmp_path))
    assert list(df["step"]) == [1, 2]
    assert final_values({"m": df}) == [{"model": "m", "step": 2, "tokens": 20, "fvu": 0.4}]
    assert read_metrics_log(str(tmp_path / "none")).empty


def test_pipeline_report_shows_the_curves_and_final_numbers(trained):
    from compsae.pipeline.report import _train_summary

    tmp, out = trained
    (tmp / "train" / CURVES_FILE).unlink()  # a train stage finished before curves were drawn
    import fsspec

    fs = fsspec.filesystem("file")
    page = _train_summary(fs, str(tmp), "train", {"outputs": out})
    assert (tmp / "train" / CURVES_FILE).exists()  # drawn from the logs on the way
    assert page.count("<tr>") == 4 and "held-out FVU" in page and "README definition" in page
