"""pipelines.yaml validation, --set overrides, stage hashing and reuse, `compsae status`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from mini_pipeline import MINI

import compsae.pipeline.runner as pipeline
from compsae import cli
from compsae.errors import UserError
from compsae.pipeline.config import load_pipeline, parse_override

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, doc: dict[str, Any] | str) -> Path:
    p = tmp_path / "pipelines.yaml"
    if isinstance(doc, dict):
        doc = yaml.safe_dump(doc).replace("RUNS", str(tmp_path / "runs"))
    p.write_text(doc)
    return p


def test_shipped_pipelines_validate():
    for name in ("demo", "pythia70m"):
        whole, pipe = load_pipeline(name, ROOT / "pipelines.yaml")
        assert pipe.harvest.hooks
    whole, pipe = load_pipeline("pythia70m", ROOT / "pipelines.yaml")
    assert pipe.harvest.model == "pythia-70m-deduped"
    assert pipe.harvest.hooks == ["blocks.3.hook_resid_post"] and pipe.harvest.context == 128


def test_override_parsing():
    assert parse_override("train.lr=0.001") == (["train", "lr"], 0.001)
    assert parse_override("harvest.hooks=[a, b]") == (["harvest", "hooks"], ["a", "b"])
    with pytest.raises(UserError, match="key.path=value"):
        parse_override("train.lr")


def test_override_applies_to_the_pipeline(tmp_path):
    p = _write(tmp_path, MINI)
    _, pipe = load_pipeline("mini", p, ["harvest.n_tokens=512", "train.models.topk.k=8"])
    assert pipe.harvest.n_tokens == 512
    assert pipe.train.models["topk"].k == 8


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("harvest.n_tokens=-5", "config error at pipelines.mini.harvest.n_tokens: "),
        (
            "harvest.dtype=float8",
            "config error at pipelines.mini.harvest.dtype: Input should be 'float16', 'bfloat16' "
            "or 'float32'",
        ),
        ("harvest.colour=red", "config error at pipelines.mini.harvest.colour: unknown key"),
        ("train.models.topk.type=nope", "config error at pipelines.mini.train.models.topk"),
    ],
)
def test_bad_values_give_one_line_with_key_path(tmp_path, capsys, override, expect):
    p = _write(tmp_path, MINI)
    rc = cli.main(["status", "--pipeline", "mini", "--config", str(p), "--set", override])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert expect in err


def test_bad_yaml_and_unknown_pipeline(tmp_path, capsys):
    p = _write(tmp_path, "pipelines: {mini: [unclosed\n")
    assert cli.main(["status", "--pipeline", "mini", "--config", str(p)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    p = _write(tmp_path, MINI)
    assert cli.main(["status", "--pipeline", "other", "--config", str(p)]) == 2
    assert "no pipeline 'other'" in capsys.readouterr().err and True
    assert cli.main(["status", "--config", str(p)]) == 2
    assert "choose a pipeline with --pipeline NAME (one of: mini)" in capsys.readouterr().err


def test_pipeline_names_cannot_escape_the_run_root(tmp_path, capsys):
    doc = yaml.safe_load(yaml.safe_dump(MINI))
    doc["pipelines"]["../evil"] = doc["pipelines"].pop("mini")
    p = _write(tmp_path, doc)
    assert cli.main(["status", "--pipeline", "../evil", "--config", str(p)]) == 2
    assert "pipeline name '../evil'" in capsys.readouterr().err


def test_stage_reuse_and_status(tmp_path, monkeypatch, capsys):
    calls: list[str] = []

    def fake_stage(stage, cfg, out_dir, inputs, force, options, **_):
        calls.append(stage)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return {"store": f"{out_dir}/store.zarr", "digest": "d"} if stage == "harvest" else {}

    monkeypatch.setattr(pipeline, "_call_stage", fake_stage)
    p = _write(tmp_path, MINI)
    base = ["--pipeline", "mini", "--config", str(p)]
    assert cli.main(["status", *base]) == 0
    out = capsys.readouterr().out
    assert "harvest  missing" in out and "train    waiting" in out

    assert cli.main(["run", *base]) == 0
    assert calls == ["harvest", "train", "analyze"]
    assert cli.main(["run", *base]) == 0
    assert calls == ["harvest", "train", "analyze"]  # nothing redone
    assert "up to date, nothing to do" in capsys.readouterr().out

    # a new train config reruns train and analyze only; the old train folder is now "stale"
    assert cli.main(["status", *base, "--set", "train.models.topk.k=8"]) == 0
    assert "train    stale" in capsys.readouterr().out
    assert cli.main(["run", *base, "--set", "train.models.topk.k=8"]) == 0
    assert calls[3:] == ["train", "analyze"]
    # --force redoes one stage
    assert cli.main(["harvest", *base, "--force"]) == 0
    assert calls[5:] == ["harvest"]
    capsys.readouterr()
    assert cli.main(["status", *base]) == 0
    assert all(
        " done " in line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(("harvest", "train"))
    )


def test_device_does_not_change_the_hash(tmp_path):
    from compsae.pipeline.runner import plan

    p = _write(tmp_path, MINI)
    w1, p1 = load_pipeline("mini", p)
    w2, p2 = load_pipeline("mini", p, ["harvest.device=cpu"])
    assert plan(w1, p1, "mini")[0].hash == plan(w2, p2, "mini")[0].hash
    w3, p3 = load_pipeline("mini", p, ["harvest.n_tokens=1024"])
    assert plan(w1, p1, "mini")[0].hash != plan(w3, p3, "mini")[0].hash


def test_probe_stage_reuses_train_and_reruns_when_train_changes(tmp_path, monkeypatch, capsys):
    calls: list[str] = []

    def fake_stage(stage, cfg, out_dir, inputs, force, options, **_):
        calls.append(stage)
        if stage == "probe":  # it reads the harvest's store and the train folder
            assert (
                inputs["harvest"]["outputs"]["store"].endswith("store.zarr")
                and "train-" in inputs["train"]["path"]
            )
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return {"store": f"{out_dir}/store.zarr", "digest": "d"} if stage == "harvest" else {}

    monkeypatch.setattr(pipeline, "_call_stage", fake_stage)
    doc = yaml.safe_load(yaml.safe_dump(MINI))
    doc["pipelines"]["mini"]["probe"] = {"n_items": 40}
    base = ["--pipeline", "mini", "--config", str(_write(tmp_path, doc))]
    assert cli.main(["probe", *base]) == 2
    assert "probe of pipeline 'mini' needs harvest, train first" in capsys.readouterr().err
    assert cli.main(["run", *base]) == 0
    assert calls == ["harvest", "train", "analyze", "probe"]
    assert cli.main(["probe", *base, "--set", "probe.ks=[1, 3]"]) == 0
    assert calls[4:] == ["probe"]
    assert cli.main(["run", *base, "--set", "train.models.topk.k=8"]) == 0
    assert calls[5:] == ["train", "analyze", "probe"]
    assert "pipeline report:" in capsys.readouterr().out
    assert (tmp_path / "runs" / "mini" / "report.html").exists()


def test_probe_needs_a_language_model(tmp_path, capsys):
    doc = {
        "runs_root": "RUNS",
        "pipelines": {
            "gt": {
                "ground_truth": {"n_rows": 1024},
                "train": {
                    "hook": "synthetic.hook_x",
                    "models": {"topk": {"type": "topk", "n_latents": 64, "k": 4}},
                },
                "probe": {},
            }
        },
    }
    assert cli.main(["status", "--pipeline", "gt", "--config", str(_write(tmp_path, doc))]) == 2
    assert "'probe' reruns the harvested LM" in capsys.readouterr().err


def test_a_forced_redo_that_dies_leaves_the_stage_not_done(tmp_path, monkeypatch, capsys):
    """--force removes the completion record before touching the outputs: a redo that dies half-way
    must leave `status` saying missing, never done over half-written outputs."""
    seen: dict[str, bool] = {}

    def fake_stage(stage, cfg, out_dir, inputs, force, options, **_):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        seen[stage] = (Path(out_dir) / "stage.json").exists()
        if force and stage == "harvest":
            raise UserError("died half-way")
        return {"store": f"{out_dir}/store.zarr", "digest": "d"} if stage == "harvest" else {}

    monkeypatch.setattr(pipeline, "_call_stage", fake_stage)
    base = ["--pipeline", "mini", "--config", str(_write(tmp_path, MINI))]
    assert cli.main(["run", *base]) == 0
    assert cli.main(["harvest", *base, "--force"]) == 2
    assert seen["harvest"] is False  # the record was already gone when the stage started writing
    capsys.readouterr()
    assert cli.main(["status", *base]) == 0
    assert "harvest  missing" in capsys.readouterr().out


def test_run_ends_with_a_summary_from_analyze_metrics(tmp_path, monkeypatch, capsys):
    import json

    def fake_stage(stage, cfg, out_dir, inputs, force, options, **_):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if stage == "analyze":
            # the layout analyze writes: per model an `all` block and a BOS-free `rest` block
            models = {
                "compsae": {
                    "all": {"fvu": 0.9, "l0": 9.0, "comp_share": 0.5},
                    "rest": {"fvu": 0.1234, "l0": 7.5, "comp_share": 0.25},
                },
                "pca": {"all": {"fvu": 0.4321, "l0": 64.0}},
            }
            (Path(out_dir) / "metrics.json").write_text(json.dumps({"models": models}))
        return {"store": f"{out_dir}/store.zarr", "digest": "d"} if stage == "harvest" else {}

    monkeypatch.setattr(pipeline, "_call_stage", fake_stage)
    p = _write(tmp_path, MINI)
    assert cli.main(["run", "--pipeline", "mini", "--config", str(p)]) == 0
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("summary:"))
    assert out[start].endswith(f"{tmp_path}/runs/mini/report.html")
    rows = {line.split()[0]: line.split()[1:] for line in out[start + 2 :]}
    assert rows["compsae"] == ["0.123", "7.5", "0.250", "rest"]  # BOS-free figures win
    assert rows["pca"] == ["0.432", "64.0", "-", "all"]
