"""The public Python API: cheap to import, and it loads what the train stage saved."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import compsae
from compsae.errors import UserError
from compsae.train.checkpoint import save_checkpoint
from compsae.train.config import make_model_config
from compsae.train.models import build_model


def test_import_compsae_loads_neither_torch_nor_zarr() -> None:
    code = "import sys, compsae; print('torch' in sys.modules, 'zarr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_load_sae_reconstructs_in_store_units(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(make_model_config(type="topk", n_latents=16, k=2), 8)
    meta = {"type": "topk", "d_in": 8, "hook": "h", "step": 3, "tokens_seen": 30, "finished": True,
            "model": {"type": "topk", "n_latents": 16, "k": 2}, "normalization": {"scale": 2.0},
            "train": {"heldout_fraction": 0.1, "seed": 4}}
    save_checkpoint(str(tmp_path / "topk"), model, meta)
    sae = compsae.load_sae(str(tmp_path / "topk"))
    x = torch.randn(5, 8)
    torch.testing.assert_close(sae.reconstruct(x), model.eval()(x * 2.0).x_hat / 2.0)
    assert [s.name for s in compsae.load_saes(str(tmp_path))] == ["topk"]


def test_open_store_refuses_a_folder_that_is_no_store(tmp_path) -> None:
    with pytest.raises(UserError):
        compsae.open_store(str(tmp_path))


def test_tl_processing_records_every_flag() -> None:
    from compsae.harvest.models import tl_processing

    on, off = tl_processing(True)["tl_processing"], tl_processing(False)["tl_processing"]
    keys = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
    assert all(on[k] for k in keys) and not any(off[k] for k in keys)


def test_toggling_fold_ln_changes_the_harvest_hash() -> None:
    from compsae.harvest.config import HarvestConfig
    from compsae.harvest.run import config_hash
    from compsae.stages import stage_hash

    on, off = HarvestConfig(weight_processing=True), HarvestConfig(weight_processing=False)
    assert config_hash(on) != config_hash(off)
    assert stage_hash("harvest", on, {}) != stage_hash("harvest", off, {})
