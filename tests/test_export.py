"""`export_saelens`: the SAELens folder layout, and numbers that reproduce compsae's reconstruction
through a numpy re-implementation of SAELens' forward (and SAELens itself when it is installed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from train_fixtures import HOOK, make_store, model_cfg

from compsae.errors import UserError
from compsae.train.checkpoint import DIGEST_KEY, content_digest, load_model
from compsae.train.config import TrainStageConfig
from compsae.train.export import export_saelens
from compsae.train.run import run_train

SMALL = {"n_latents": 64, "k": 4, "d_f": 16, "d_c": 8, "n_heads": 4, "aux_k": 16}


def saelens_forward(
    x: np.ndarray, w: dict[str, np.ndarray], cfg: dict
) -> tuple[np.ndarray, np.ndarray]:
    """SAELens' inference forward for "standard" and "topk" SAEs, in numpy: (latents,
    reconstruction)."""
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        top = np.argpartition(-pre, cfg["k"] - 1, axis=-1)[:, : cfg["k"]]
        z = np.zeros_like(pre)
        np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, -1), 0), -1)
    else:
        z = np.maximum(pre, 0)
    return z, z @ w["W_dec"] + w["b_dec"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    store, x = make_store(str(tmp / "s.zarr"), n=1024)
    cfg = TrainStageConfig(
        hook=HOOK,
        batch_size=64,
        tokens=64 * 20,
        log_every=10,
        checkpoint_every=100,
        device="cpu",
        lr=1e-3,
        heldout_fraction=0.1,
        mix_chunks=4,
        normalize=True,
        models={
            "topk": model_cfg("topk", **SMALL),
            "relu": model_cfg("relu", **SMALL),
            "comp": model_cfg("compsae", **SMALL),
        },
    )
    run_train(cfg, store.url, str(tmp / "train"), progress=False)
    return tmp, x[:256] * 3.0  # raw activations, off the training scale


@pytest.mark.parametrize("name, architecture", [("topk", "topk"), ("relu", "standard")])
def test_export_reproduces_the_reconstruction(trained, name, architecture):
    tmp, x = trained
    summary = export_saelens(str(tmp / "train" / name), str(tmp / f"sl_{name}"))
    out = tmp / f"sl_{name}"
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((out / "cfg.json").read_text())
    w = load_file(out / "sae_weights.safetensors")
    assert set(w) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert w["W_enc"].shape == (16, 64) and w["W_dec"].shape == (64, 16)
    assert w["b_enc"].shape == (64,) and w["b_dec"].shape == (16,)
    assert all(v.dtype == np.float32 for v in w.values())
    assert cfg["architecture"] == architecture == summary["architecture"]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == (
        16,
        64,
        "float32",
        "none",
    )
    assert cfg["metadata"]["hook_name"] == cfg["hook_name"] == HOOK and cfg["hook_layer"] == 0
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg.get("k") == (4 if architecture == "topk" else None)

    model, meta = load_model(str(tmp / "train" / name))
    scale = meta["normalization"]["scale"]
    assert scale != pytest.approx(1.0) and summary["normalization_scale"] == scale
    with torch.no_grad():
        ref = model(torch.from_numpy(x) * scale)
    z, x_hat = saelens_forward(x, w, cfg)
    np.testing.assert_allclose(x_hat, ref.x_hat.numpy() / scale, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z, ref.z.numpy(), rtol=1e-4, atol=1e-4)  # the same latents
    assert ((z != 0).sum(-1) <= 4).all() if architecture == "topk" else (z != 0).any()


def test_compsae_needs_the_explicit_topk_flag(trained):
    tmp, x = trained
    with pytest.raises(UserError, match="CompSAE.*--as-topk"):
        export_saelens(str(tmp / "train" / "comp"), str(tmp / "sl_comp"))
    assert not (tmp / "sl_comp").exists()
    export_saelens(
        str(tmp / "train" / "comp"), str(tmp / "sl_comp"), as_topk=True, model_name="tiny-neox"
    )
    cfg = json.loads((tmp / "sl_comp" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["metadata"]["model_name"] == "tiny-neox"
    assert "composition network left out" in cfg["compsae"]["part"]
    model, meta = load_model(str(tmp / "train" / "comp"))
    scale = meta["normalization"]["scale"]
    with torch.no_grad():
        out = model(torch.from_numpy(x) * scale)
    linear = (out.x_hat - out.comp).numpy() / scale  # compsae without its composition term
    _, x_hat = saelens_forward(x, load_file(tmp / "sl_comp" / "sae_weights.safetensors"), cfg)
    np.testing.assert_allclose(x_hat, linear, rtol=1e-4, atol=1e-4)


def test_saelens_itself_loads_the_export(trained):
    sae_lens = pytest.importorskip("sae_lens")
    tmp, x = trained
    export_saelens(str(tmp / "train" / "topk"), str(tmp / "sl_lib"))
    sae = sae_lens.SAE.load_from_disk(str(tmp / "sl_lib"), device="cpu")
    model, meta = load_model(str(tmp / "train" / "topk"))
    scale = meta["normalization"]["scale"]
    with torch.no_grad():
        np.testing.assert_allclose(
            sae(torch.from_numpy(x)).numpy(),
            model(torch.from_numpy(x) * scale).x_hat.numpy() / scale,
            rtol=1e-4,
            atol=1e-4,
        )


def test_an_existing_export_is_never_overwritten(trained):
    tmp, _ = trained
    out = tmp / "sl_twice"
    export_saelens(str(tmp / "train" / "topk"), str(out))
    before = (out / "sae_weights.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds cfg.json.*another --out"):
        export_saelens(str(tmp / "train" / "relu"), str(out))
    assert (out / "sae_weights.safetensors").read_bytes() == before
    (tmp / "a_file").write_text("x")
    with pytest.raises(UserError, match="another --out"):
        export_saelens(str(tmp / "train" / "topk"), str(tmp / "a_file"))


def test_non_finite_weights_are_refused_on_load_and_export(trained):
    import shutil

    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    tmp, _ = trained
    bad = tmp / "nan_model"
    shutil.copytree(tmp / "train" / "topk", bad)
    data = (bad / "model.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    weights = st_load(data)
    weights["W_dec"][3, 1] = float("nan")  # as a diverged training saves it: with a matching digest
    meta = json.loads(header["__metadata__"]["meta"][64:])  # after its content digest
    packed = content_digest(weights, meta) + json.dumps(meta, sort_keys=True)
    (bad / "model.safetensors").write_bytes(st_save(weights, metadata={"meta": packed}))
    published = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**published, DIGEST_KEY: packed[:64]}))
    with pytest.raises(UserError, match="weight W_dec holds NaN or inf"):
        load_model(str(bad))
    with pytest.raises(UserError, match="NaN or inf"):
        export_saelens(str(bad), str(tmp / "sl_nan"))
    assert not (tmp / "sl_nan").exists()
