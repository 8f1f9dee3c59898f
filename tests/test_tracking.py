"""`train.log: wandb`: the metrics go to a W&B run (offline here: no network), off by default,
never part of the stage hash."""

from __future__ import annotations

import json
import sys

import pytest
from train_fixtures import HOOK, make_store

from compsae.errors import UserError
from compsae.stages import stage_hash
from compsae.train.config import TrainStageConfig, make_model_config
from compsae.train.run import run_train, training_hash


def stage_cfg(**extra) -> TrainStageConfig:
    return TrainStageConfig(
        hook=HOOK,
        batch_size=64,
        tokens=64 * 6,
        log_every=2,
        checkpoint_every=100,
        device="cpu",
        heldout_fraction=0.1,
        mix_chunks=4,
        models={"topk": make_model_config(type="topk", n_latents=32, k=4, aux_k=8)},
        **extra,
    )


def test_logging_choice_is_not_part_of_the_hashes():
    plain, logged = stage_cfg(), stage_cfg(log="wandb", wandb_project="elsewhere")
    assert plain.log == "none"  # off by default
    assert stage_hash("train", plain, {}) == stage_hash("train", logged, {})
    assert training_hash(
        plain.model_for("topk"), plain.train_for("topk"), HOOK, "s"
    ) == training_hash(logged.model_for("topk"), logged.train_for("topk"), HOOK, "s")


def test_offline_wandb_run_gets_the_logged_keys(tmp_path, monkeypatch):
    pytest.importorskip(
        "wandb", reason="the wandb extra (pip install -e '.[wandb]') is not installed"
    )
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
    }.items():
        monkeypatch.setenv(var, value)
    store, _ = make_store(str(tmp_path / "s.zarr"), n=1024)
    stage = tmp_path / "runs" / "mypipe" / "train-abc"
    out = run_train(stage_cfg(log="wandb"), store.url, str(stage), progress=False)
    runs = list((stage / "wandb").glob("offline-run-*"))
    config_hash = json.loads((stage / "topk" / "config.json").read_text())["config_hash"]
    assert len(runs) == 1 and runs[0].name.endswith(f"topk-{config_hash}")
    data = next(runs[0].glob("run-*.wandb")).read_bytes()
    logged = [
        json.loads(line) for line in (stage / "topk" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(logged) == 3
    for key in logged[0]:
        if key not in ("step", "k", "m") and logged[0][key] is not None:
            assert f"train/{key}".encode() in data, key
    assert (
        b"compsae-mypipe" in data and b"train-abc" in data
    )  # project from the pipeline, group = stage folder
    assert b"heldout/fvu" in data  # the held-out metrics as the run's summary
    assert set(out["models"]) == {"topk"}  # the wandb folder is not taken for a model
    # a rerun reuses the finished model and opens no second run
    run_train(stage_cfg(log="wandb"), store.url, str(stage), progress=False)
    assert len(list((stage / "wandb").glob("offline-run-*"))) == 1


def test_missing_wandb_is_one_line(monkeypatch):
    from compsae.train.tracking import make_tracker

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match=r"wandb is not installed: pip install -e '.\[wandb\]'"):
        make_tracker("wandb", "p", "n", "g", {}, "id", ".")
    assert make_tracker("none", "p", "n", "g", {}, "id", ".") is None
