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


# -- checkpoints cannot shed their digest -------------------------------------------------------

_SETS = ["--set", "train.batch_size=64", "--set", "train.tokens=256"]


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A harvested and trained mini pipeline (runs root `runs`, relative to the folder)."""
    import copy

    from compsae import cli

    root = tmp_path_factory.mktemp("mini_run")
    cfg = copy.deepcopy(MINI)
    cfg["runs_root"] = "runs"
    (root / "p.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in ("harvest", "train"):
            assert cli.main([stage, "--pipeline", "mini", "--config", "p.yaml", *_SETS]) == 0
    return root


def _copy_of(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of `run` as the working folder; returns its topk model folder."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(run, work)
    monkeypatch.chdir(work)
    return next((work / "runs" / "mini").glob("train-*")) / "topk"


def _rewrite_model(folder: Path, header: str, factor: float = 1.0, config: str = "keep") -> None:
    """Rewrite `folder`'s model.safetensors: weights times `factor`; its compsae header `kept`,
    with the digest prefix `stripped`, or replaced by a first-format header (`first`: only the
    step); config.json's digests `keep` or `drop`."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        weights = {k: f.get_tensor(k) * factor for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
    text = meta["meta"]
    body = text[text.index("{") :]
    if header == "stripped":
        meta["meta"] = body
    elif header == "first":
        meta = {"step": str(json.loads(body)["step"])}
    save_file(weights, str(path), metadata=meta)
    if config == "drop":
        published = json.loads((folder / "config.json").read_text())
        for key in ("content_sha256", "state_sha256"):
            published.pop(key, None)
        (folder / "config.json").write_text(json.dumps(published))


@pytest.mark.parametrize("header", ["stripped", "first"])
def test_analyze_refuses_a_checkpoint_whose_digest_was_stripped_and_weights_doubled(
    mini_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    header: str,
) -> None:
    from cli_checks import one_line_error

    from compsae import cli

    topk = _copy_of(mini_run, tmp_path, monkeypatch)
    _rewrite_model(topk, header, factor=2.0)  # config.json still names the digest
    argv = ["--pipeline", "mini", "--config", "p.yaml", *_SETS]
    line = one_line_error(capsys, ["analyze", *argv], "topk/model.safetensors", "restore it")
    assert "--trust-unverified" not in line  # a digest is named: trusting cannot help
    assert not list(Path("runs/mini").glob("analyze-*/stage.json"))
    one_line_error(capsys, ["export", str(topk), "--out", str(tmp_path / "sl")], "restore it")
    assert not (tmp_path / "sl").exists()
    # verify on the checkpoint folder alone reports it (not only verify on the whole run)
    assert cli.main(["verify", str(topk)]) == 2
    out = capsys.readouterr().out
    assert "topk/model.safetensors" in out and "restore it" in out, out
    assert cli.main(["verify", str(topk), "--trust-unverified"]) == 2  # no way round a digest
    capsys.readouterr()


def test_a_checkpoint_with_no_digest_anywhere_loads_only_when_trusted(
    mini_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cli_checks import one_line_error

    import compsae.train.checkpoint as checkpoint
    from compsae import cli, load_sae
    from compsae.errors import UserError

    topk = _copy_of(mini_run, tmp_path, monkeypatch)
    _rewrite_model(topk, "stripped", config="drop")  # as an older or foreign checkpoint
    monkeypatch.setattr(checkpoint, "_warned_unverified", set())
    argv = ["--pipeline", "mini", "--config", "p.yaml", *_SETS]
    one_line_error(capsys, ["analyze", *argv], "no content digest", "--trust-unverified")
    with pytest.raises(UserError, match="trust_unverified=True"):
        load_sae(str(topk))
    assert cli.main(["verify", str(topk)]) == 2
    assert "no content digest" in capsys.readouterr().out

    sae = load_sae(str(topk), trust_unverified=True)
    assert sae.n_latents == 64
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "unverified" in warned[0]
    monkeypatch.setattr(checkpoint, "_warned_unverified", set())
    assert cli.main(["verify", str(topk), "--trust-unverified"]) == 0
    err = capsys.readouterr().err
    assert sum("warning:" in ln for ln in err.splitlines()) == 1, err
    monkeypatch.setattr(checkpoint, "_warned_unverified", set())
    assert cli.main(["analyze", *argv, "--trust-unverified"]) == 0
    err = capsys.readouterr().err
    assert sum(ln.startswith("warning: ") for ln in err.splitlines()) == 1, err
    assert list(Path("runs/mini").glob("analyze-*/stage.json"))


def test_a_worker_reloading_a_trusted_checkpoint_does_not_warn_again(
    mini_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import compsae.analysis.reconstructors as reconstructors
    import compsae.train.checkpoint as checkpoint
    from compsae.analysis.reconstructors import SAEReconstructor

    topk = _copy_of(mini_run, tmp_path, monkeypatch)
    _rewrite_model(topk, "stripped", config="drop")
    monkeypatch.setattr(checkpoint, "_warned_unverified", set())
    monkeypatch.setattr(reconstructors, "_MODEL_CACHE", {})
    rec = SAEReconstructor.from_checkpoint("topk", str(topk), trust_unverified=True)
    assert capsys.readouterr().err.count("warning: ") == 1
    # what a worker process gets: the state without the model, a fresh cache, no warning yet
    shipped = SAEReconstructor.__new__(SAEReconstructor)
    shipped.__dict__.update(rec.__getstate__())
    monkeypatch.setattr(checkpoint, "_warned_unverified", set())
    monkeypatch.setattr(reconstructors, "_MODEL_CACHE", {})
    assert shipped.model is not None and shipped.trust_unverified
    assert "warning" not in capsys.readouterr().err


def test_config_json_alone_vouches_for_weights_under_a_bare_header(tmp_path: Path) -> None:
    """A header without compsae's metadata: the weights must match the digest config.json
    names; they load when they do, whatever the header."""
    import json

    from safetensors.torch import load_file, save_file

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
    folder = tmp_path / "topk"
    save_checkpoint(str(folder), build_model(cfg, 16), meta)
    path = str(folder / "model.safetensors")
    weights = load_file(path)
    save_file(weights, path)  # no metadata at all
    assert load_model(str(folder))[1]["step"] == 7
    weights["W_dec"][0, 0] += 1.0
    save_file(weights, path)
    with pytest.raises(UserError, match="does not match the digest config.json names"):
        load_model(str(folder), trust_unverified=True)
    published = json.loads((folder / "config.json").read_text())
    published.pop("content_sha256")
    (folder / "config.json").write_text(json.dumps(published))
    with pytest.raises(UserError, match="different steps"):  # no digest, no step: not ours
        load_model(str(folder), trust_unverified=True)


# -- --force deletes only what compsae wrote ------------------------------------------------------


def test_harvest_force_refuses_a_store_holding_a_users_file_and_deletes_nothing(
    mini_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cli_checks import one_line_error

    from compsae import cli
    from compsae.store import ActivationStore

    _copy_of(mini_run, tmp_path, monkeypatch)
    store = next(Path("runs/mini").glob("harvest-*")) / "store.zarr"
    before = sorted(str(p) for p in store.rglob("*"))
    notes = store / "notes.txt"
    notes.write_text("mine")
    # inside an array's chunk folder, where only zarr's chunk keys are compsae's
    hidden = next(store.glob("acts/*/c")) / "keep.csv"
    hidden.write_text("mine too")
    argv = ["harvest", "--pipeline", "mini", "--config", "p.yaml", "--force"]
    line = one_line_error(capsys, argv, "holds 2 files compsae did not write", "move them out")
    assert f"(the first: acts/{hidden.parent.parent.name}/c/keep.csv)" in line, line
    assert notes.read_text() == "mine" and hidden.read_text() == "mine too"
    assert sorted(str(p) for p in store.rglob("*")) == sorted([*before, str(notes), str(hidden)])
    assert ActivationStore.open(str(store)).complete  # nothing of the store deleted either

    hidden.unlink()
    one_line_error(capsys, argv, "holds a file compsae did not write (notes.txt)", "move it out")
    notes.unlink()
    (hidden.parent / "0" / "0.0123abcd.partial").write_bytes(b"")  # a killed shard write's
    assert cli.main(argv) == 0  # only compsae's files: redone
    assert not (hidden.parent / "0" / "0.0123abcd.partial").exists()
    assert ActivationStore.open(str(store)).complete


def test_a_ground_truth_store_reruns_with_force_and_keeps_a_users_file(tmp_path: Path) -> None:
    from compsae.errors import ForeignFilesError
    from compsae.evaluation.ground_truth.design import (
        load_ground_truth,
        write_ground_truth_store,
    )

    cfg = GroundTruthConfig(d_model=16, n_features=32, n_rows=2000, n_interactions={2: 4})
    url = str(tmp_path / "gt.zarr")
    write_ground_truth_store(cfg, url)
    # its own ground truth (and a killed write's temporary chunk) are compsae's: replaced
    leftover = next((tmp_path / "gt.zarr").glob("acts/*/c/0")) / "0.0123abcd.partial"
    leftover.write_bytes(b"")
    write_ground_truth_store(cfg, url, overwrite=True)
    assert not leftover.exists() and load_ground_truth(url).config["n_rows"] == 2000
    mine = tmp_path / "gt.zarr" / "ground_truth.json.bak"
    mine.write_text("mine")
    with pytest.raises(ForeignFilesError, match=r"\(ground_truth.json.bak\)"):
        write_ground_truth_store(cfg, url, overwrite=True)
    assert mine.read_text() == "mine"


def test_train_force_keeps_a_users_file_named_like_a_temporary_file(tmp_path: Path) -> None:
    from compsae.errors import ForeignFilesError
    from compsae.train.checkpoint import remove_checkpoint

    folder = tmp_path / "topk"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.0123abcd.partial").write_bytes(b"")  # a killed write's
    mine = folder / "draft.partial"
    mine.write_text("mine")
    with pytest.raises(ForeignFilesError, match=r"a file compsae did not write \(draft.partial\)"):
        remove_checkpoint(str(folder))
    assert mine.exists() and (folder / "config.json").exists()
    mine.unlink()
    remove_checkpoint(str(folder))
    assert not folder.exists()
