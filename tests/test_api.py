"""The public Python API: cheap to import, and it loads what the train stage saved."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
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
    meta = {
        "type": "topk",
        "d_in": 8,
        "hook": "h",
        "step": 3,
        "tokens_seen": 30,
        "finished": True,
        "model": {"type": "topk", "n_latents": 16, "k": 2},
        "normalization": {"scale": 2.0},
        "train": {"heldout_fraction": 0.1, "seed": 4},
    }
    save_checkpoint(str(tmp_path / "topk"), model, meta)
    sae = compsae.load_sae(str(tmp_path / "topk"))
    x = torch.randn(5, 8)
    torch.testing.assert_close(sae.reconstruct(x), model.eval()(x * 2.0).x_hat / 2.0)
    assert [s.name for s in compsae.load_saes(str(tmp_path))] == ["topk"]


def test_open_store_refuses_a_folder_that_is_no_store(tmp_path) -> None:
    with pytest.raises(UserError):
        compsae.open_store(str(tmp_path))


def test_tl_processing_records_every_flag() -> None:
    from compsae.lm.models import tl_processing

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
    meta = {
        "type": cfg.type,
        "d_in": 8,
        "hook": "h",
        "step": 3,
        "tokens_seen": 30,
        "finished": True,
        "model": cfg.model_dump(),
        "normalization": {"scale": scale},
        "train": {"heldout_fraction": 0.1, "seed": 4},
    }
    save_checkpoint(str(tmp_path / name), net, meta)
    return net.eval(), str(tmp_path / name)


@pytest.mark.parametrize(
    "model",
    [
        {"type": "topk"},
        {"type": "compsae", "composer": "pair"},
        {"type": "compsae", "composer": "attention", "d_f": 8, "n_heads": 2, "d_c": 8},
    ],
)
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
    _, folder = _saved(
        tmp_path, "m", 2.0, type="compsae", composer="attention", d_f=8, n_heads=2, d_c=8
    )
    sae = compsae.load_sae(folder)
    x = torch.randn(4, 8)
    codes = sae.encode(x)
    eff = sae.pair_effects(x)
    assert eff.latents.shape == (4, 3, 2) and eff.delta.shape == (4, 3, 8)
    t, p = 1, 2  # token 1, pair of positions (1, 2)
    i, j = eff.latents[t, p].tolist()
    assert [i, j] == codes.idx[t, 1:].tolist()

    def without(*drop: int) -> torch.Tensor:
        z = codes.z[t : t + 1].clone()
        z[0, list(drop)] = 0
        return sae.decode(Codes(z, codes.idx[t : t + 1]))[0]

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


def _store_model(tmp_path, **model: object) -> tuple[compsae.api.TrainedSAE, object, object]:
    """A synthetic store (d=16) and a model of its hook saved with a held-out split of a quarter."""
    from train_fixtures import HOOK, make_store

    store, x = make_store(str(tmp_path / "store"), n=1024)
    torch.manual_seed(0)
    cfg = make_model_config(n_latents=16, k=3, **model)
    net = build_model(cfg, 16)
    if hasattr(net, "pair"):
        with torch.no_grad():
            net.pair.W_out.normal_()
    meta = {
        "type": cfg.type,
        "d_in": 16,
        "hook": HOOK,
        "step": 1,
        "tokens_seen": 1,
        "finished": True,
        "model": cfg.model_dump(),
        "normalization": {"scale": 0.5},
        "split": {"fraction": 0.25, "seed": 7},
    }
    save_checkpoint(str(tmp_path / "m"), net, meta)
    return compsae.load_sae(str(tmp_path / "m")), store, x


def test_batches_serve_the_checkpoints_own_heldout_rows(tmp_path) -> None:
    from compsae.store.split import heldout_mask

    sae, store, x = _store_model(tmp_path, type="topk")
    got = torch.cat(list(sae.batches(store, batch_size=32, shuffle=False))).numpy()
    want = x[heldout_mask(store._column("seq_id"), 0.25, 7)]
    assert 0 < len(want) < len(x)
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731  (row order of the two sides may differ)
    np.testing.assert_array_equal(key(got), key(want))  # store units: no normalisation applied


def test_top_pairs_of_a_model_and_of_a_run_folder(tmp_path) -> None:
    import json

    sae, store, _ = _store_model(tmp_path, type="compsae", composer="pair")
    rows = compsae.top_pairs(sae, n=5, store=store, batch_size=64)
    assert 0 < len(rows) <= 5
    assert all(r.i < r.j and r.tokens > 0 and r.mean_effect > 0 for r in rows)
    assert [r.gain_share for r in rows] == sorted((r.gain_share for r in rows), reverse=True)
    # a run folder: its analyze stage's metrics.json, every model's pairs, best first
    stage = tmp_path / "runs" / "p" / "analyze-abc"
    stage.mkdir(parents=True)
    pair = {"i": 1, "j": 4, "tokens": 9, "mean_effect": 0.3, "gain_share": 0.01}
    metrics = {
        "models": {
            "a": {"pairs": {"top_pairs": [pair]}},
            "b": {"pairs": {"top_pairs": [{**pair, "i": 2, "gain_share": 0.05}]}},
            "topk": {},
        }
    }
    (stage / "metrics.json").write_text(json.dumps(metrics))
    table = compsae.top_pairs(str(tmp_path / "runs" / "p"))
    assert [(r.model, r.i, r.j, r.gain_share) for r in table] == [
        ("b", 2, 4, 0.05),
        ("a", 1, 4, 0.01),
    ]
    assert compsae.top_pairs(str(stage), n=1) == table[:1]
    with pytest.raises(UserError):
        compsae.top_pairs(str(tmp_path))


def test_top_pairs_of_an_additive_model_are_empty(tmp_path) -> None:
    sae, store, _ = _store_model(tmp_path, type="compsae", composer="none")
    assert compsae.top_pairs(sae, store=store, batch_size=64) == []


def test_top_pairs_of_a_model_agree_with_the_analyze_sums(tmp_path) -> None:
    from compsae.analysis.pair_effects import PairEffectSums

    sae, store, _ = _store_model(
        tmp_path, type="compsae", composer="attention", d_f=8, n_heads=2, d_c=8
    )
    rows = compsae.top_pairs(sae, n=3, store=store, batch_size=64)
    sums = PairEffectSums.empty(16)
    for x in sae.batches(store, batch_size=64, shuffle=False):
        out = sae.forward(x)  # model units, as analyze works
        idx = out.active_idx
        sums.update(sae.model, x * sae.scale, out.x_hat, idx, out.z.gather(1, idx))
    gain, effect = sums.gain_share(), sums.mean_effect()
    assert rows
    for r in rows:
        assert r.gain_share == pytest.approx(gain[r.i, r.j], rel=1e-4)
        assert r.mean_effect == pytest.approx(effect[r.i, r.j], rel=1e-4)


def test_run_stage_returns_the_typed_record(tmp_path) -> None:
    import yaml

    from compsae.harvest.records import HarvestOutputs

    doc = {
        "runs_root": "IGNORED",
        "pipelines": {
            "gt": {
                "ground_truth": {"n_rows": 256, "d_model": 8, "n_features": 16, "n_pairs": 2},
                "train": {
                    "hook": "synthetic.hook_x",
                    "models": {"topk": {"type": "topk", "n_latents": 16, "k": 2}},
                },
            }
        },
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    rec = compsae.run_stage(
        "gt",
        "harvest",
        config=str(tmp_path / "p.yaml"),
        runs_root=str(tmp_path / "runs"),
        say=lambda _: None,
    )
    assert isinstance(rec.outputs, HarvestOutputs)
    assert rec.stage == "harvest" and rec.folder.startswith(
        str(tmp_path / "runs" / "gt" / "harvest-")
    )
    assert compsae.open_store(rec.outputs.store).n_rows == 256
    again = compsae.run_stage(
        "gt",
        "harvest",
        config=str(tmp_path / "p.yaml"),
        runs_root=str(tmp_path / "runs"),
        say=lambda _: None,
    )
    assert again.hash == rec.hash and again.finished_at == rec.finished_at  # reused, not rerun


def test_stage_records_written_before_the_envelope_still_read() -> None:
    from compsae.stages import StageRecord
    from compsae.train.records import TrainOutputs

    old = {
        "stage": "train",
        "hash": "abc",
        "config": {"hook": "h"},
        "inputs": {"harvest": {"hash": "def", "path": "/r/harvest-def"}},
        "outputs": {
            "store": "/r/s.zarr",
            "hook": "h",
            "heldout_fraction": 0.05,
            "store_manifest_hash": "m",
            "digest": "d",
            "models": {},
        },
        "finished_at": "x",
        "version": "0.0.1",
        "legacy_field": 3,
    }
    rec = StageRecord[TrainOutputs].model_validate(old)
    assert rec.inputs["harvest"].path == "/r/harvest-def" and rec.folder is None
    assert rec.model_dump()["legacy_field"] == 3
