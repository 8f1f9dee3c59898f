"""SAELens in both directions: `import_saelens` (SAELens folder -> compsae checkpoint) and
`export_saelens` (compsae checkpoint -> SAELens folder), checked against the real `sae-lens`
package where it is installed (the `saelens` extra), and against a numpy re-implementation of
SAELens' forward everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from compsae.cli import main
from compsae.errors import UserError
from compsae.train.checkpoint import load_model, save_checkpoint
from compsae.train.config import TrainStageConfig, make_model_config
from compsae.train.export import export_saelens
from compsae.train.models import build_model
from compsae.train.saelens_import import import_saelens

D, N, K = 12, 48, 5
HOOK = "blocks.2.hook_resid_post"


def random_saelens_weights(architecture: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights as SAELens stores them; decoder rows deliberately not unit norm."""
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(D, N, generator=g) / D**0.5,
        "b_enc": 0.1 * torch.randn(N, generator=g),
        "W_dec": torch.randn(N, D, generator=g) * torch.rand(N, 1, generator=g) * 2,
        "b_dec": torch.randn(D, generator=g),
    }
    if architecture == "jumprelu":
        w["threshold"] = 0.3 * torch.rand(N, generator=g)
    return w


def saelens_cfg(architecture: str, **extra) -> dict:
    cfg = {
        "architecture": architecture,
        "d_in": D,
        "d_sae": N,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "model_name": "tiny-neox", "hook_name": HOOK},
    }
    if architecture == "topk":
        cfg["k"] = K
    return cfg | extra


def write_folder(path, cfg: dict, weights: dict[str, torch.Tensor]) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(path / "sae_weights.safetensors")
    )
    return str(path)


def reference_forward(
    x: np.ndarray, w: dict[str, torch.Tensor], cfg: dict
) -> tuple[np.ndarray, np.ndarray]:
    """SAELens' inference forward in numpy (standard / topk / jumprelu): (latents,
    reconstruction)."""
    w = {k: v.double().numpy() for k, v in w.items()}
    pre = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
    r = (
        np.linalg.norm(w["W_dec"], axis=-1)
        if cfg.get("rescale_acts_by_decoder_norm")
        else np.ones(N)
    )
    if cfg["architecture"] == "topk":
        scaled = pre * r
        top = np.argsort(-scaled, axis=-1)[:, : cfg["k"]]
        z = np.zeros_like(pre)
        np.put_along_axis(z, top, np.maximum(np.take_along_axis(scaled, top, -1), 0), -1)
    elif cfg["architecture"] == "jumprelu":
        z = np.maximum(pre, 0) * (pre > w["threshold"])
    else:
        z = np.maximum(pre, 0)
    return z, (z / r) @ w["W_dec"] + w["b_dec"]


def compsae_forward(folder: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model, meta = load_model(folder)
    assert meta["normalization"] is None  # raw activations in, like the SAELens SAE
    with torch.no_grad():
        out = model(torch.from_numpy(x).float())
    return out.z.double().numpy(), out.x_hat.double().numpy()


def sample(n: int = 256, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32) * 2


@pytest.mark.parametrize(
    "architecture, extra",
    [
        ("standard", {}),
        ("topk", {}),
        ("jumprelu", {}),
        ("standard", {"apply_b_dec_to_input": False}),
        ("topk", {"rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False}),
    ],
)
def test_import_reproduces_saelens_forward(tmp_path, architecture, extra):
    cfg, w = saelens_cfg(architecture, **extra), random_saelens_weights(architecture)
    src = write_folder(tmp_path / "sl", cfg, w)
    summary = import_saelens(src, str(tmp_path / "ck"))
    assert (
        summary["type"]
        == {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[architecture]
    )
    assert summary["hook"] == HOOK and (summary["k"] == K) == (architecture == "topk")
    assert (len(summary["folds"]) > 0) == bool(extra)
    x = sample()
    z_ref, x_ref = reference_forward(x.astype(np.float64), w, cfg)
    z, x_hat = compsae_forward(str(tmp_path / "ck"), x)
    assert ((z != 0) == (z_ref != 0)).mean() > 0.999  # the same latents fire (float ties aside)
    np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x_hat, x_ref, rtol=1e-4, atol=1e-4)
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert (
        meta["imported"]["architecture"] == architecture
        and meta["imported"]["model_name"] == "tiny-neox"
    )


def test_pre_6_config_is_read(tmp_path):
    cfg = {
        "d_in": D,
        "d_sae": N,
        "hook_point": HOOK,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "model_name": "gpt2",
        "apply_b_dec_to_input": True,
    }
    w = random_saelens_weights("topk")
    summary = import_saelens(write_folder(tmp_path / "sl", cfg, w), str(tmp_path / "ck"))
    assert (summary["architecture"], summary["k"], summary["hook"]) == ("topk", K, HOOK)
    z, _ = compsae_forward(str(tmp_path / "ck"), sample())
    assert ((z != 0).sum(-1) <= K).all()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architecture": "gated"}, "architecture 'gated' cannot be imported"),
        ({"normalize_activations": "expected_average_only_in"}, "fold the normalisation"),
        ({"reshape_activations": "hook_z"}, "hook_z"),
        ({"d_in": D + 1}, "W_enc has shape"),
    ],
)
def test_bad_folders_are_refused_in_one_line(tmp_path, change, message):
    src = write_folder(
        tmp_path / "sl", saelens_cfg("standard") | change, random_saelens_weights("standard")
    )
    with pytest.raises(UserError, match=message):
        import_saelens(src, str(tmp_path / "ck"))
    assert not (tmp_path / "ck").exists()


def test_cli_import_and_its_errors(tmp_path, capsys):
    src = write_folder(tmp_path / "sl", saelens_cfg("jumprelu"), random_saelens_weights("jumprelu"))
    assert main(["import", "--format", "saelens", src]) == 0
    assert "jumprelu" in capsys.readouterr().out
    assert load_model(f"{src}/compsae")[1]["type"] == "jumprelu"
    (tmp_path / "empty").mkdir()
    assert main(["import", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "cfg.json is missing" in err and "\n" not in err


def test_jumprelu_is_not_trainable():
    with pytest.raises(ValueError, match="imported.*not trained"):
        TrainStageConfig(
            hook=HOOK, models={"j": make_model_config(type="jumprelu", n_latents=8, k=2)}
        )


def test_compsae_round_trip_export_then_import(tmp_path):
    """export (scale folded into the weights) then import: the same reconstruction of raw inputs."""
    torch.manual_seed(0)
    model = build_model(make_model_config(type="topk", n_latents=N, k=K), D)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_()
    scale = 2.5
    save_checkpoint(
        str(tmp_path / "ck"),
        model,
        {
            "step": 1,
            "hook": HOOK,
            "d_in": D,
            "type": "topk",
            "model": model.cfg.model_dump(mode="json"),
            "normalization": {"scale": scale},
        },
    )
    export_saelens(str(tmp_path / "ck"), str(tmp_path / "sl"))
    import_saelens(str(tmp_path / "sl"), str(tmp_path / "back"))
    x = sample()
    with torch.no_grad():
        ref = model(torch.from_numpy(x) * scale)
    z, x_hat = compsae_forward(str(tmp_path / "back"), x)
    np.testing.assert_allclose(z, ref.z.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x_hat, ref.x_hat.numpy() / scale, rtol=1e-4, atol=1e-4)


# -- against the real package ----------------------------------------------------------------------


def _saelens():
    return pytest.importorskip(
        "sae_lens", reason="the saelens extra (pip install -e '.[saelens]') is not installed"
    )


def _saelens_sae(sae_lens, architecture: str, **extra):
    cfg_cls = {
        "standard": sae_lens.StandardSAEConfig,
        "topk": sae_lens.TopKSAEConfig,
        "jumprelu": sae_lens.JumpReLUSAEConfig,
    }[architecture]
    sae_cls = {
        "standard": sae_lens.StandardSAE,
        "topk": sae_lens.TopKSAE,
        "jumprelu": sae_lens.JumpReLUSAE,
    }[architecture]
    kwargs = {"k": K} if architecture == "topk" else {}
    sae = sae_cls(cfg_cls(d_in=D, d_sae=N, **kwargs, **extra))
    with torch.no_grad():
        for name, t in random_saelens_weights(architecture, seed=3).items():
            getattr(sae, name).copy_(t)
    return sae


@pytest.mark.parametrize(
    "architecture, extra",
    [
        ("standard", {}),
        ("topk", {}),
        ("jumprelu", {}),
        ("standard", {"apply_b_dec_to_input": False}),
        ("topk", {"rescale_acts_by_decoder_norm": True}),
    ],
)
def test_saelens_save_then_import_is_equal(tmp_path, architecture, extra):
    sae_lens = _saelens()
    sae = _saelens_sae(sae_lens, architecture, **extra)
    sae.save_model(tmp_path / "sl")
    import_saelens(str(tmp_path / "sl"), str(tmp_path / "ck"), hook=HOOK)
    x = sample()
    with torch.no_grad():
        z_ref = sae.encode(torch.from_numpy(x)).double().numpy()
        x_ref = sae.decode(torch.from_numpy(z_ref).float()).double().numpy()
    z, x_hat = compsae_forward(str(tmp_path / "ck"), x)
    assert ((z != 0) == (z_ref != 0)).mean() > 0.999
    np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x_hat, x_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_export_then_saelens_load_is_equal(tmp_path, architecture):
    """compsae checkpoint (a normalisation factor to fold) -> export -> SAE.load_from_disk."""
    sae_lens = _saelens()
    torch.manual_seed(1)
    mtype = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[architecture]
    model = build_model(make_model_config(type=mtype, n_latents=N, k=K), D)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_()
        if mtype == "jumprelu":
            model.threshold.uniform_(0, 0.3)
    scale = 1.7
    save_checkpoint(
        str(tmp_path / "ck"),
        model,
        {
            "step": 1,
            "hook": HOOK,
            "d_in": D,
            "type": mtype,
            "model": model.cfg.model_dump(mode="json"),
            "normalization": {"scale": scale},
        },
    )
    export_saelens(str(tmp_path / "ck"), str(tmp_path / "sl"))
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"), device="cpu")
    assert sae.cfg.architecture() == architecture
    x = sample()
    with torch.no_grad():
        ref = model(torch.from_numpy(x) * scale)
        z = sae.encode(torch.from_numpy(x))
        x_hat = sae.decode(z)
    assert ((z != 0) == (ref.z != 0)).float().mean() > 0.999
    np.testing.assert_allclose(z.numpy(), ref.z.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x_hat.numpy(), ref.x_hat.numpy() / scale, rtol=1e-4, atol=1e-4)


def test_pipeline_lists_imported_saes_beside_trained_ones(tmp_path):
    """`train.imported`: the train stage imports the SAE into its folder; analyze scores it with
    the trained model, on the trained model's held-out split, with the same metrics."""
    from train_fixtures import HOOK as STORE_HOOK
    from train_fixtures import make_store

    from compsae.analysis.config import AnalyzeConfig
    from compsae.analysis.run import run_analyze
    from compsae.train.run import run_train

    store, x = make_store(str(tmp_path / "s.zarr"), n=1024)
    d = x.shape[1]
    cfg = saelens_cfg("jumprelu", d_in=d) | {
        "metadata": {"hook_name": "blocks.0.hook_resid_post.renamed"}
    }
    g = torch.Generator().manual_seed(0)
    w = {
        "W_enc": torch.randn(d, N, generator=g),
        "b_enc": torch.zeros(N),
        "W_dec": torch.randn(N, d, generator=g) / 4,
        "b_dec": torch.from_numpy(x.mean(0)),
        "threshold": torch.full((N,), 0.5),
    }
    src = write_folder(tmp_path / "sl", cfg, w)
    stage = {
        "hook": STORE_HOOK,
        "batch_size": 64,
        "tokens": 64 * 5,
        "device": "cpu",
        "heldout_fraction": 0.25,
        "mix_chunks": 4,
        "models": {"topk": {"type": "topk", "n_latents": 32, "k": 4, "aux_k": 8}},
        "imported": {"gemma_like": {"path": src}},
    }
    with pytest.raises(UserError, match="reads hook .*renamed.*give the import a `hook:`"):
        run_train(
            TrainStageConfig.model_validate(stage),
            store.url,
            str(tmp_path / "train_bad"),
            progress=False,
        )
    stage["imported"]["gemma_like"]["hook"] = STORE_HOOK
    out = run_train(
        TrainStageConfig.model_validate(stage), store.url, str(tmp_path / "train"), progress=False
    )
    rec = out["models"]["gemma_like"]
    assert (
        rec["type"] == "jumprelu" and rec["imported"]["source"] == src and rec["heldout"]["fvu"] > 0
    )

    result = run_analyze(
        AnalyzeConfig(baselines=[], ce=False, plots=False, progress=False, max_heldout_tokens=512),
        store.url,
        str(tmp_path / "train"),
        str(tmp_path / "analyze"),
    )
    metrics = json.loads((tmp_path / "analyze" / "metrics.json").read_text())
    assert set(result["headline"]) == {"topk", "gemma_like"}
    assert metrics["heldout_fraction"] == 0.25  # the trained model's split, not a default
    imported = metrics["models"]["gemma_like"]
    assert imported["kind"] == "jumprelu" and 0 < imported["all"]["l0"] < N
    # the same FVU as the SAE itself gives on those rows (raw activations in)
    from compsae.store.split import heldout_mask

    keep = np.flatnonzero(heldout_mask(store.seq_id, 0.25, metrics["heldout_seed"]))[:512]
    rows = store.read_rows(STORE_HOOK, 0, store.n_rows)[keep].astype(np.float64)
    _, x_ref = reference_forward(rows, w, cfg)
    fvu = ((rows - x_ref) ** 2).sum() / ((rows - rows.mean(0)) ** 2).sum()
    assert imported["all"]["fvu"] == pytest.approx(fvu, rel=1e-3)


def test_import_never_writes_over_a_trained_model_or_other_files(tmp_path):
    src = write_folder(tmp_path / "sl", saelens_cfg("topk"), random_saelens_weights("topk"))
    model = build_model(make_model_config(type="topk", n_latents=N, k=K), D)
    save_checkpoint(
        str(tmp_path / "trained"),
        model,
        {"step": 3, "type": "topk", "d_in": D, "model": model.cfg.model_dump(mode="json")},
    )
    before = (tmp_path / "trained" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="holds a trained compsae model"):
        import_saelens(src, str(tmp_path / "trained"))
    assert (tmp_path / "trained" / "model.safetensors").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an imported checkpoint"):
        import_saelens(src, str(tmp_path / "other"))
    import_saelens(src, str(tmp_path / "ck"))
    import_saelens(src, str(tmp_path / "ck"))  # importing again over an import is fine


def test_a_pipeline_may_only_import():
    only = TrainStageConfig.model_validate(
        {"hook": HOOK, "models": {}, "imported": {"gs": {"path": "/x"}}}
    )
    assert only.models == {} and only.imported["gs"].format == "saelens"
    with pytest.raises(ValueError, match="list at least one model"):
        TrainStageConfig.model_validate({"hook": HOOK, "models": {}})
    with pytest.raises(ValueError, match="same name"):
        TrainStageConfig.model_validate(
            {"hook": HOOK, "models": {"gs": {"type": "topk"}}, "imported": {"gs": {"path": "/x"}}}
        )
