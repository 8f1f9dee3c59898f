"""The weight processing a harvest applied is in its manifest; train and analyze refuse a store
harvested with other processing than the config asks for."""

from __future__ import annotations

import copy

import pytest
import yaml
from mini_pipeline import MINI

from compsae import cli
from compsae.errors import UserError
from compsae.lm.processing import PROCESSING_FLAGS, check_store_processing, recorded_flags
from compsae.store import ActivationStore, integrity

SETS = ["--set", "train.batch_size=64", "--set", "train.tokens=256"]


def _pipeline(tmp_path) -> list[str]:
    cfg = copy.deepcopy(MINI)
    cfg["runs_root"] = str(tmp_path / "runs")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    return ["--pipeline", "mini", "--config", str(tmp_path / "p.yaml"), *SETS]


def _store(tmp_path) -> str:
    (folder,) = (tmp_path / "runs" / "mini").glob("harvest-*")
    return str(folder / "store.zarr")


def _tamper(url: str, **flags: bool) -> None:
    """Rewrite the store's recorded processing, digests included (as another install's harvest
    would have written it)."""
    st = ActivationStore.open(url, mode="r+")
    st.manifest["model"]["tl_processing"].update(flags)
    st.manifest[integrity.INTEGRITY] = integrity.metadata_digests(st)
    st.group.attrs["manifest"] = st.manifest


def test_the_harvest_records_every_processing_flag(tmp_path) -> None:
    base = _pipeline(tmp_path)
    assert cli.main(["harvest", *base]) == 0
    flags = ActivationStore.open(_store(tmp_path)).manifest["model"]["tl_processing"]
    assert {f: flags[f] for f in PROCESSING_FLAGS} == dict.fromkeys(PROCESSING_FLAGS, False)


def test_train_and_analyze_refuse_a_store_of_other_processing(tmp_path, capsys) -> None:
    base = _pipeline(tmp_path)
    assert cli.main(["harvest", *base]) == 0
    _tamper(_store(tmp_path), fold_ln=True)
    capsys.readouterr()
    assert cli.main(["train", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "harvested with fold_ln=true but the config asks harvest.weight_processing=false" in err
    assert "re-harvest it (`compsae harvest --force`) or set harvest.weight_processing=true" in err

    _tamper(_store(tmp_path), fold_ln=False)  # as harvested: train runs
    assert cli.main(["train", *base]) == 0
    _tamper(_store(tmp_path), center_unembed=True, fold_value_biases=True)
    capsys.readouterr()
    assert cli.main(["analyze", *base]) == 2
    err = capsys.readouterr().err
    assert "center_unembed=true (and fold_value_biases)" in err


def test_stores_without_flags_are_read_by_their_processing_switch() -> None:
    assert recorded_flags({"model": {"processing": True}}) == dict.fromkeys(PROCESSING_FLAGS, True)
    assert recorded_flags({"model": {"source": "synthetic"}}) is None
    check_store_processing({"model": {"processing": False}}, False, "s")
    check_store_processing({}, True, "s")  # not harvested from an LM: nothing to compare
    with pytest.raises(UserError, match="fold_ln=false"):
        check_store_processing({"model": {"processing": False}}, True, "s")
