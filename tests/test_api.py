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
from compsae.train.trained import Codes


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


def _saved(tmp_path, name: str, scale: float, **model: object) -> tuple[torch.nn.Module, str]:
    """A freshly initialised model saved as a train-stage folder with normalisation `scale`."""
    torch.manual_seed(0)
    cfg = make_model_config(n_latents=16, k=3, **model)
    net = build_model(cfg, 8)
    if hasattr(net, "pair"):
        with torch.no_grad():
            net.pair.W_out.normal_()  # a non-zero pair path (it starts at zero)
    meta = {"type": cfg.type, "d_in": 8, "hook": "h", "step": 3, "tokens_seen": 30, "finished": True,
            "model": cfg.model_dump(), "normalization": {"scale": scale},
            "train": {"heldout_fraction": 0.1, "seed": 4}}
    save_checkpoint(str(tmp_path / name), net, meta)
    return net.eval(), str(tmp_path / name)


@pytest.mark.parametrize("model", [{"type": "topk"}, {"type": "compsae", "composer": "pair"},
                                   {"type": "compsae", "composer": "attention", "d_f": 8, "n_heads": 2,
                                    "d_c": 8}])
def test_encode_decode_are_in_store_units(tmp_path, model) -> None:
    net, folder = _saved(tmp_path, "m", 2.0, **model)
    sae = compsae.load_sae(folder)
    x = torch.randn(6, 8) * 3
    codes = sae.encode(x)
    ref = net(x * 2.0)  # model units: the checkpoint's scale applied once
    torch.testing.assert_close(codes.z, ref.z / 2.0)
    torch.testing.assert_close(sae.decode(codes), sae.reconstruct(x))
    torch.testing.assert_close(sae.reconstruct(x), ref.x_hat / 2.0)
    # the reconstruction is no scaled copy of the model-unit output (the scale is not lost)
    assert not torch.allclose(sae.reconstruct(x), ref.x_hat, atol=1e-3)
    assert (sae.forward(x).x_hat - ref.x_hat).abs().max() < 1e-5  # forward: documented model units


def test_pair_effects_are_mixed_differences_of_decode(tmp_path) -> None:
    _, folder = _saved(tmp_path, "m", 2.0, type="compsae", composer="attention", d_f=8, n_heads=2, d_c=8)
    sae = compsae.load_sae(folder)
    x = torch.randn(4, 8)
    codes = sae.encode(x)
    eff = sae.pair_effects(x)
    assert eff.latents.shape == (4, 3, 2) and eff.delta.shape == (4, 3, 8)
    t, p = 1, 2  # token 1, pair of positions (1, 2)
    i, j = eff.latents[t, p].tolist()
    assert [i, j] == codes.idx[t, 1:].tolist()

    def without(*drop: int) -> torch.Tensor:
        z = codes.z[t:t + 1].clone()
        z[0, list(drop)] = 0
        return sae.decode(Codes(z, codes.idx[t:t + 1]))[0]

    expected = without() - without(i) - without(j) + without(i, j)
    torch.testing.assert_close(eff.delta[t, p], expected, atol=1e-5, rtol=1e-4)
    assert eff.norm[t, p] > 0  # the attention composer does compose


def test_pair_effects_of_the_pair_decoder_are_its_terms(tmp_path) -> None:
    net, folder = _saved(tmp_path, "m", 2.0, type="compsae", composer="pair")
    sae = compsae.load_sae(folder)
    x = torch.randn(5, 8)
    codes = sae.encode(x)
    vals = codes.values * 2.0
    u = net.pair.items(codes.idx, vals)
    a, b = torch.triu_indices(3, 3, offset=1)
    terms = (u[:, a] * u[:, b]) @ net.pair.W_out / 2.0
    assert terms.abs().max() > 1e-3
    torch.testing.assert_close(sae.pair_effects(x).delta, terms, atol=1e-5, rtol=1e-4)


def test_pair_effects_of_a_plain_topk_model_vanish(tmp_path) -> None:
    _, folder = _saved(tmp_path, "m", 2.0, type="topk")
    eff = compsae.load_sae(folder).pair_effects(torch.randn(3, 8))
    assert eff.norm.max() < 1e-5
