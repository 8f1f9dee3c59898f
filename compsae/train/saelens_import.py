"""Import an SAE saved by SAELens (`cfg.json` + `sae_weights.safetensors`) as a compsae checkpoint,
so `compsae analyze`, the probes and the human-evaluation kit score it with the same metrics as
compsae's own models.

SAELens' inference forward for the architectures taken here is
    pre = (x − b_dec·a) W_enc + b_enc              a = apply_b_dec_to_input (0 or 1)
    z   = ReLU(pre)                                 "standard"
        = ReLU of the k largest of pre·r           "topk"  (r = ‖W_dec[i]‖ when
        rescale_acts_by_decoder_norm, else 1) = ReLU(pre) · [pre > θ]                     "jumprelu"
    x̂   = (z / r) W_dec + b_dec
compsae's models compute `pre = (x − b_dec) W_enc + b_enc` and `x̂ = z W_dec + b_dec`, so two exact
folds bring every variant to that form: a = 0 becomes `b_enc + b_dec W_enc`, and r moves into the
weights (`W_enc·r`, `b_enc·r`, `W_dec/r`), which leaves the latents equal to SAELens' `encode`.
The imported model takes the raw activations (no normalisation factor), like the SAELens SAE.

Refused with a one-line reason: other architectures (gated, transcoders, ...), run-time input
normalisation (`normalize_activations` other than "none": fold it first), `hook_z` reshaping
and the old `finetuning_scaling_factor`.  Pre-6.0 configs (flat `activation_fn_str`, `hook_point`)
are read too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from compsae.errors import UserError
from compsae.train.checkpoint import read_meta, save_checkpoint
from compsae.train.config import ModelConfig, make_model_config
from compsae.train.export import CFG_FILE, WEIGHTS_FILE
from compsae.train.models import build_model

# SAELens architecture -> compsae model type
ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
UNIT_NORM_TOLERANCE = 1e-3


def _read(folder: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    fs, path = fsspec.core.url_to_fs(folder.rstrip("/"))
    try:
        raw_cfg = fs.cat_file(f"{path}/{CFG_FILE}")
        raw_weights = fs.cat_file(f"{path}/{WEIGHTS_FILE}")
    except FileNotFoundError as e:
        raise UserError(
            f"{folder} is not a SAELens SAE folder: {str(e.filename or e).rsplit('/', 1)[-1]} is "
            "missing "
            f"(expected {CFG_FILE} and {WEIGHTS_FILE}, as SAE.save_model writes)"
        ) from None
    try:
        cfg = json.loads(raw_cfg)
    except ValueError:
        raise UserError(f"{folder}/{CFG_FILE} is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{folder}/{CFG_FILE} must hold a JSON object")
    try:  # safetensors parses a JSON header and raw bytes only: nothing here can run code
        weights = st_load(raw_weights)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise UserError(
            f"{folder}/{WEIGHTS_FILE} is not a valid safetensors file ({str(e)[:80]})"
        ) from None
    return cfg, weights


def architecture_of(cfg: dict[str, Any]) -> str:
    """SAELens' architecture name, also for pre-6.0 configs (flat `activation_fn_str`)."""
    if cfg.get("architecture"):
        return str(cfg["architecture"])
    act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    return (
        "topk" if act == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") else "standard"
    )


def _field(cfg: dict[str, Any], *names: str) -> Any:
    """The first of `names` found in the config's metadata or at its top level (older layouts)."""
    meta = cfg.get("metadata") or {}
    for name in names:
        for where in (meta, cfg):
            if where.get(name) is not None:
                return where[name]
    return None


def _check(cfg: dict[str, Any], architecture: str, where: str) -> None:
    if architecture not in ARCHITECTURES:
        raise UserError(
            f"{where}: SAELens architecture {architecture!r} cannot be imported; compsae imports "
            f"{', '.join(ARCHITECTURES)}"
        )
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise UserError(
            f"{where}: normalize_activations is {norm!r}; compsae imports SAEs that take the raw "
            "activations: fold the normalisation into the weights in SAELens (e.g. "
            "fold_activation_norm_scaling_factor) and save again"
        )
    if (cfg.get("reshape_activations") or "none") != "none" or _field(
        cfg, "hook_head_index"
    ) is not None:
        raise UserError(
            f"{where}: SAEs on reshaped attention outputs (hook_z, a head index) cannot be imported"
        )
    if cfg.get("finetuning_scaling_factor"):
        raise UserError(f"{where}: finetuning_scaling_factor SAEs (SAELens < 6) cannot be imported")


def _tensor(
    weights: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], where: str
) -> torch.Tensor:
    if key not in weights:
        raise UserError(
            f"{where}/{WEIGHTS_FILE} has no tensor {key!r} (it holds {', '.join(sorted(weights))})"
        )
    t = weights[key].float()
    if tuple(t.shape) != shape:
        raise UserError(
            f"{where}/{WEIGHTS_FILE}: {key} has shape {tuple(t.shape)}, the cfg says {shape}"
        )
    return t


def compsae_weights(
    cfg: dict[str, Any], weights: dict[str, torch.Tensor], where: str = "SAE"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """compsae's tensors (`W_enc [d, n]`, `b_enc [n]`, `W_dec [n, d]`, `b_dec [d]`, and `threshold
    [n]` for jumprelu) for a SAELens SAE, the folds of the module docstring applied; and the folds'
    names."""
    d, n = int(cfg["d_in"]), int(cfg["d_sae"])
    w_enc = _tensor(weights, "W_enc", (d, n), where)
    w_dec = _tensor(weights, "W_dec", (n, d), where)
    b_enc = _tensor(weights, "b_enc", (n,), where)
    b_dec = _tensor(weights, "b_dec", (d,), where)
    folds = []
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ w_enc  # x W + b = (x − b_dec) W + (b + b_dec W)
        folds.append("apply_b_dec_to_input=false folded into b_enc")
    out = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    if architecture_of(cfg) == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        r = torch.linalg.vector_norm(w_dec, dim=-1)  # [n]
        out.update(W_enc=w_enc * r, b_enc=b_enc * r, W_dec=w_dec / r[:, None])
        folds.append("rescale_acts_by_decoder_norm folded into the weights")
    if architecture_of(cfg) == "jumprelu":
        if "threshold" in weights:
            out["threshold"] = _tensor(weights, "threshold", (n,), where)
        elif "log_threshold" in weights:  # older JumpReLU training checkpoints
            out["threshold"] = _tensor(weights, "log_threshold", (n,), where).exp()
        else:
            _tensor(weights, "threshold", (n,), where)  # raises: names what is there
    return {k: v.contiguous() for k, v in out.items()}, folds


def model_config(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ModelConfig:
    """The compsae ModelConfig of an imported SAE (training-only settings left at their
    defaults)."""
    architecture = architecture_of(cfg)
    n = int(cfg["d_sae"])
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    norms = torch.linalg.vector_norm(tensors["W_dec"], dim=-1)
    unit = bool(((norms - 1).abs() < UNIT_NORM_TOLERANCE).all())
    kind = ARCHITECTURES[architecture]
    if kind == "topk":
        return make_model_config(
            type=kind,
            n_latents=n,
            k=int(k),
            graduated_sparsity=False,
            unit_norm_decoder=unit,
            aux_k=min(256, n),
        )
    return make_model_config(type=kind, n_latents=n, k=min(32, n), unit_norm_decoder=unit)


def _check_target(out_dir: str) -> None:
    """Refuse to write over anything but an earlier import: a trained model or other files there
    would be lost."""
    existing = read_meta(out_dir)
    if existing is not None:
        if not existing.get("imported"):
            raise UserError(
                f"{out_dir} holds a trained compsae model; import into another folder (--out)"
            )
        return
    fs, path = fsspec.core.url_to_fs(out_dir.rstrip("/"))
    if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
        raise UserError(
            f"{out_dir} exists and is not an imported checkpoint; import into a new folder (--out)"
        )


def import_saelens(
    folder: str,
    out_dir: str,
    name: str | None = None,
    hook: str | None = None,
    expect_hook: str | None = None,
    expect_d_in: int | None = None,
    split: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read the SAELens SAE in `folder` and write it to `out_dir` as a compsae checkpoint
    (`model.safetensors` + `config.json`), which `load_model` and every analysis stage read.

    `hook` overrides the hook name of the SAE's cfg (the store hook it reads).  `expect_hook` /
    `expect_d_in` (a pipeline's store) refuse, before anything is written, an SAE of another hook or
    width.  `split` (a pipeline's held-out split) is recorded as the split it is scored on.  Returns
    a summary: out_dir, type, architecture, d_in, d_sae, k, hook, folds."""
    cfg, weights = _read(folder)
    where = folder.rstrip("/")
    architecture = architecture_of(cfg)
    _check(cfg, architecture, where)
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise UserError(
                f"{where}/{CFG_FILE}: {key} must be a positive integer, got {cfg.get(key)!r}"
            )
    hook_name = hook or _field(cfg, "hook_name", "hook_point") or expect_hook or ""
    if expect_hook is not None and hook_name != expect_hook:
        raise UserError(
            f"{where} reads hook {hook_name!r}, the pipeline's store hook is {expect_hook!r}; give "
            "the import a `hook:` when they are the same activations under another name"
        )
    if expect_d_in is not None and cfg["d_in"] != expect_d_in:
        raise UserError(
            f"{where} takes d_in = {cfg['d_in']} activations, the store's {hook_name!r} has "
            f"{expect_d_in} dimensions"
        )
    _check_target(out_dir)
    tensors, folds = compsae_weights(cfg, weights, where)
    mcfg = model_config(cfg, tensors)
    model = build_model(mcfg, int(cfg["d_in"]))
    model.load_state_dict(tensors)
    digest = hashlib.sha256(
        b"".join(t.numpy().tobytes() for _, t in sorted(tensors.items()))
    ).hexdigest()[:16]
    meta = {
        "type": mcfg.type,
        "model": mcfg.model_dump(mode="json"),
        "d_in": int(cfg["d_in"]),
        "hook": hook_name,
        "normalization": None,  # the SAE takes raw activations, as in SAELens
        "step": 0,
        "tokens_seen": None,
        "finished": True,
        "config_hash": f"saelens-{digest}",
        "store_manifest_hash": None,
        "name": name or where.rsplit("/", 1)[-1],
        "imported": {
            "format": "saelens",
            "source": where,
            "architecture": architecture,
            "model_name": _field(cfg, "model_name"),
            "sae_lens_version": _field(cfg, "sae_lens_version"),
            "dataset_path": _field(cfg, "dataset_path"),
            "folds": folds,
        },
    }
    if split is not None:
        meta["split"] = split
    save_checkpoint(out_dir, model, meta)
    return {
        "out_dir": out_dir,
        "type": mcfg.type,
        "architecture": architecture,
        "d_in": int(cfg["d_in"]),
        "d_sae": int(cfg["d_sae"]),
        "k": mcfg.k if mcfg.type == "topk" else None,
        "hook": hook_name,
        "folds": folds,
    }
