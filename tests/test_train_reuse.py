"""A rerun of the train stage trains only the models whose settings changed; each rerun says why."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml
from mini_pipeline import MINI

import compsae.train.run as train_run
from compsae import cli

SETS = ["--set", "train.batch_size=64", "--set", "train.tokens=256"]


def _two_models(tmp_path: Path) -> list[str]:
    cfg = copy.deepcopy(MINI)
    cfg["runs_root"] = str(tmp_path / "runs")
    pipe = cfg["pipelines"]["mini"]
    pipe.pop("analyze")
    pipe["train"]["models"] = {
        "small": {"type": "topk", "n_latents": 32, "k": 4},
        "wide": {"type": "topk", "n_latents": 64, "k": 4},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    return ["--pipeline", "mini", "--config", str(tmp_path / "p.yaml"), *SETS]


def _train_folders(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "runs" / "mini").glob("train-*"))


def test_changing_one_models_k_trains_that_model_only(tmp_path, monkeypatch, capsys) -> None:
    base = _two_models(tmp_path)
    trained: list[str] = []
    real = train_run.train_one

    def spy(name, *args, **kwargs):
        trained.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(train_run, "train_one", spy)
    assert cli.main(["run", *base]) == 0
    assert trained == ["small", "wide"]
    out = capsys.readouterr().out
    assert "training small: no earlier run of it" in out
    (first,) = _train_folders(tmp_path)
    before = (first / "wide" / "model.safetensors").read_bytes()

    trained.clear()
    assert cli.main(["run", *base, "--set", "train.models.small.k=2"]) == 0
    assert trained == ["small"]  # wide came from the first run
    out = capsys.readouterr().out
    assert "train: rerun because train.models.small.k changed (4 -> 2)" in out
    assert "training small: k changed (4 -> 2)" in out
    assert "reused wide (unchanged)" in out
    second = next(f for f in _train_folders(tmp_path) if f != first)
    for name in ("model.safetensors", "train_state.safetensors", "config.json", "metrics.jsonl"):
        assert (second / "wide" / name).read_bytes() == (first / "wide" / name).read_bytes()
    assert (second / "wide" / "model.safetensors").read_bytes() == before
    # the record is carried over, pointing at the new folder
    record = json.loads((second / "stage.json").read_text())
    old = json.loads((first / "stage.json").read_text())
    wide = record["outputs"]["models"]["wide"]
    assert wide["path"] == "./wide"
    assert wide["heldout"] == old["outputs"]["models"]["wide"]["heldout"]
    assert wide["model_digest"] == old["outputs"]["models"]["wide"]["model_digest"]
    small = record["outputs"]["models"]["small"]["model_digest"]
    assert small != old["outputs"]["models"]["small"]["model_digest"]  # retrained at k=2


def test_a_changed_harvest_reruns_train_and_says_so(tmp_path, monkeypatch, capsys) -> None:
    base = _two_models(tmp_path)
    assert cli.main(["run", *base]) == 0
    capsys.readouterr()
    assert cli.main(["run", *base, "--set", "harvest.model_seed=1"]) == 0
    out = capsys.readouterr().out
    assert "harvest: rerun because harvest.model_seed changed (0 -> 1)" in out
    assert "train: rerun because upstream stage harvest changed" in out
    assert "training small: store changed" in out  # the data differ: nothing is reused
    assert "reused" not in out


def test_force_says_it_redoes_the_stage(tmp_path, capsys) -> None:
    base = _two_models(tmp_path)
    assert cli.main(["train", *base]) == 2  # no harvest yet
    assert cli.main(["run", *base]) == 0
    capsys.readouterr()
    assert cli.main(["train", *base, "--force"]) == 0
    out = capsys.readouterr().out
    assert "train: rerun because --force asks to redo it" in out
    assert "training small: --force starts it over" in out
