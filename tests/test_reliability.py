"""Input checks that must hold at their edges: names ending in a newline, the file-system root."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml
from mini_pipeline import MINI
from pydantic import ValidationError

import compsae.pipeline.config as config
from compsae import verify
from compsae.evaluation.ground_truth.config import GroundTruthConfig


def test_a_pipeline_name_ending_in_a_newline_is_refused():
    doc = yaml.safe_load(yaml.safe_dump(MINI))
    doc["pipelines"]["mini\n"] = doc["pipelines"].pop("mini")
    with pytest.raises(ValidationError, match="pipeline name"):
        config.PipelinesFile.model_validate(doc)


def test_verify_of_the_file_system_root_looks_at_the_root_not_the_working_folder(
    tmp_path, monkeypatch
):
    # An empty path after stripping "/" used to resolve to the working folder.
    seen: list[str] = []
    real = verify._folders

    def spy(fs, path, depth=0):
        seen.append(path)
        return iter(())

    monkeypatch.setattr(verify, "_folders", spy)
    monkeypatch.chdir(tmp_path)
    # Only the folder it looked at matters here, not what it then concluded.
    with contextlib.suppress(Exception):
        verify.verify_path("/")
    monkeypatch.setattr(verify, "_folders", real)
    assert seen and seen[0] == "/"


@pytest.mark.parametrize("hook", ["a..b", "../x", "a/b", ".."])
def test_a_ground_truth_hook_name_that_leaves_the_store_is_refused(hook):
    with pytest.raises(ValidationError, match="must be a dotted name"):
        GroundTruthConfig(hook=hook)
    assert GroundTruthConfig(hook="synthetic.hook_x").hook == "synthetic.hook_x"


def test_a_model_folder_without_its_config_json_is_a_one_line_error(tmp_path: Path) -> None:
    from compsae.errors import UserError
    from compsae.train.trained import model_folders

    (tmp_path / "topk").mkdir()
    (tmp_path / "topk" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"topk has model\.safetensors but no config\.json"):
        model_folders(str(tmp_path))


def test_a_checkpoint_whose_digest_was_stripped_and_weights_changed_is_refused(
    tmp_path: Path,
) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from compsae.errors import UserError
    from compsae.train.checkpoint import load_model, save_checkpoint
    from compsae.train.config import make_model_config
    from compsae.train.models import build_model

    cfg = make_model_config(type="topk", n_latents=32, k=4)
    meta = {
        "model": cfg.model_dump(mode="json"),
        "d_in": 16,
        "hook": "h.a",
        "step": 7,
        "tokens_seen": 700,
        "finished": True,
        "config_hash": "rel",
        "normalization": {"scale": 1.0},
    }
    folder = str(tmp_path / "topk")
    save_checkpoint(folder, build_model(cfg, 16), meta)
    load_model(folder)  # pristine: loads
    path = f"{folder}/model.safetensors"
    with safe_open(path, "pt") as f:
        header = dict(f.metadata())
        weights = {k: f.get_tensor(k) * 2 for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    text = header["meta"]
    header["meta"] = text[text.index("{") :]  # the digest prefix removed
    json.loads(header["meta"])
    save_file(weights, path, metadata=header)
    with pytest.raises(UserError, match="no content digest"):
        load_model(folder)
    # `compsae verify <checkpoint folder>` reports it too (it loads the same way)
    assert any("no content digest" in p for p in verify.checkpoint_problems(folder))


def test_a_field_the_chosen_composer_ignores_is_reported() -> None:
    from compsae.train.config import make_model_config

    assert make_model_config(type="compsae", composer="pair", n_heads=4).ignored_fields() == [
        "n_heads"
    ]
    assert make_model_config(type="compsae", composer="attention", n_heads=4).ignored_fields() == []
    assert make_model_config(
        type="compsae", composer="attention", pair_rank=8
    ).ignored_fields() == ["pair_rank"]


def test_verify_gives_one_verdict_from_any_folder_and_after_a_move(tmp_path, monkeypatch) -> None:
    import copy
    import shutil

    import yaml
    from mini_pipeline import MINI

    from compsae import cli

    cfg = copy.deepcopy(MINI)
    cfg["runs_root"] = "runs"  # relative: records written while the cwd is the project
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    sets = ["--set", "train.batch_size=64", "--set", "train.tokens=256"]
    for stage in ("harvest", "train"):
        assert cli.main([stage, "--pipeline", "mini", "--config", "p.yaml", *sets]) == 0
    assert verify.verify_path("runs/mini")[0] == []
    assert verify.verify_path(str(tmp_path / "runs" / "mini"))[0] == []
    monkeypatch.chdir(tmp_path / "runs" / "mini")
    assert verify.verify_path(".")[0] == []
    monkeypatch.chdir(tmp_path)
    shutil.move(str(tmp_path / "runs"), str(tmp_path / "moved"))
    assert verify.verify_path("moved/mini")[0] == []
    weights = next((tmp_path / "moved" / "mini").glob("train-*")) / "topk" / "model.safetensors"
    weights.unlink()
    problems = verify.verify_path("moved/mini")[0]
    assert problems and all("model.safetensors" in p for p in problems), problems
