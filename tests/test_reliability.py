"""Input checks that must hold at their edges: names ending in a newline, the file-system root."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml
from mini_pipeline import MINI
from pydantic import ValidationError

from compsae import config, verify
from compsae.evaluation.config import GroundTruthConfig


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
