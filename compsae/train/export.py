"""Export a trained TopK or ReLU SAE (or an imported JumpReLU one) in SAELens' on-disk format: a
folder with `cfg.json` and `sae_weights.safetensors` (`W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec
[d_sae, d_in]`, `b_dec [d_in]`), which `sae_lens.SAE.load_from_disk(folder)` loads.

SAELens' forward for these architectures is
    z = act((x − b_dec) W_enc + b_enc),  act = ReLU ("standard") or ReLU of the top k ("topk")
    x̂ = z W_dec + b_dec,
which is compsae's own forward for `ReLUSAE` and `TopKSAE`.  compsae trains on activations scaled
by one factor s (mean norm → sqrt(d_model)); the export folds s into the weights
(W_enc·s, W_dec/s, b_dec/s, b_enc unchanged — the same fold as SAELens'
`fold_activation_norm_scaling_factor`), so the exported SAE takes the model's raw activations, its
latents equal compsae's, its reconstruction is compsae's divided by s, and the cfg says
`normalize_activations: "none"`.  Folding, rather than recording s for SAELens to apply, keeps the
file correct for every SAELens version and for any other reader of the format.

A CompSAE has a composition network SAELens cannot represent: it is refused unless
`as_topk=True`, which exports its TopK dictionary alone (its reconstruction lacks the gated
composition term).  A CompSAE trained with composer "none" *is* a TopK SAE and exports as one.

`cfg.json` is written in the SAELens ≥ 6 layout (architecture, d_in, d_sae, dtype, device,
apply_b_dec_to_input, normalize_activations, reshape_activations, k, and `metadata` with the model
and hook), plus the flat fields older SAELens versions read (model_name, hook_name, hook_layer,
activation_fn_str, activation_fn_kwargs, context_size, prepend_bos, ...)."""

from __future__ import annotations

import json
import re
from typing import Any

import fsspec
import torch
from safetensors.torch import save as st_save

from compsae import durable
from compsae.errors import UserError
from compsae.files import STAGE_RECORD
from compsae.train.checkpoint import load_model
from compsae.train.models import CompSAE, JumpReLUSAE, ReLUSAE, SparseAutoencoder, TopKSAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# SAELens ≥ 6 reads a cfg whose metadata carries a version ≥ 6.0.0 as written (older ones are
# converted field by field); this marks the layout, not a SAELens installation.
SAELENS_FORMAT_VERSION = "6.0.0"


def _architecture(model: SparseAutoencoder, as_topk: bool, where: str) -> str:
    if isinstance(model, CompSAE) and model.cfg.composer != "none" and not as_topk:
        raise UserError(
            f"{where} is a CompSAE: SAELens has no composition network; export its TopK dictionary "
            "alone with --as-topk (as_topk=True), knowing its reconstructions then lack the "
            "composition term"
        )
    if isinstance(model, TopKSAE):  # CompSAE is a TopKSAE plus the composition path
        return "topk"
    if isinstance(model, ReLUSAE):
        return "standard"
    if isinstance(model, JumpReLUSAE):
        return "jumprelu"
    raise UserError(
        f"{where}: cannot export a {type(model).__name__} to SAELens (TopK, ReLU and JumpReLU SAEs "
        "only)"
    )


def saelens_weights(model: SparseAutoencoder, scale: float) -> dict[str, torch.Tensor]:
    """SAELens' tensors for `model`, with the input normalisation factor `scale` folded in:
    `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]` (and `threshold
    [d_sae]` for JumpReLU), float32."""
    with torch.no_grad():
        tensors = {
            "W_enc": model.W_enc.float() * scale,  # (s·x − b) W = (x − b/s)(s·W)
            "b_enc": model.b_enc.float().clone(),
            "W_dec": model.W_dec.float() / scale,  # x̂ = (z W_dec + b_dec) / s
            "b_dec": model.b_dec.float() / scale,
        }
        if isinstance(model, JumpReLUSAE):
            tensors["threshold"] = (
                model.threshold.float().clone()
            )  # pre-activations are unchanged by the fold
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _hook_layer(hook: str) -> int | None:
    found = re.match(r"blocks\.(\d+)\.", hook)
    return int(found.group(1)) if found else None


def _harvest_manifest(model_dir: str) -> dict[str, Any]:
    """The store manifest of the run `model_dir` was trained in (via the train stage's stage.json
    one folder up), or {} when that cannot be found: the model name and context are then unknown."""
    try:
        fs, path = fsspec.core.url_to_fs(model_dir.rstrip("/"))
        record = json.loads(fs.cat_file(f"{path.rsplit('/', 1)[0]}/{STAGE_RECORD}"))
        from compsae.store import ActivationStore
        from compsae.train.records import TrainOutputs

        return dict(
            ActivationStore.open(TrainOutputs.model_validate(record["outputs"]).store).manifest
        )
    except Exception:  # noqa: BLE001 - best effort: metadata only, never the weights
        return {}


def saelens_cfg(
    model: SparseAutoencoder,
    architecture: str,
    meta: dict[str, Any],
    manifest: dict[str, Any],
    model_name: str | None = None,
) -> dict[str, Any]:
    """cfg.json for SAELens (≥ 6 layout plus the flat fields of older versions)."""
    hook = str(meta.get("hook", ""))
    model_name = model_name or (manifest.get("model") or {}).get("name")
    data = manifest.get("data") or {}
    context = manifest.get("context")
    prepend_bos = bool(manifest.get("prepend_bos", True))
    dataset = data.get("source")
    k = int(model.cfg.k) if architecture == "topk" else None
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": model_name,
        "model_class_name": "HookedTransformer",
        "hook_name": hook,
        "hook_head_index": None,
        "context_size": context,
        "prepend_bos": prepend_bos,
        "dataset_path": dataset,
        "model_from_pretrained_kwargs": {},
    }
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": int(model.d_in),
        "d_sae": int(model.cfg.n_latents),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,  # compsae encodes x − b_dec
        "normalize_activations": "none",  # the normalisation factor is folded into the weights
        "reshape_activations": "none",
        "metadata": metadata,
        # the flat fields SAELens < 6 reads
        "model_name": model_name,
        "hook_name": hook,
        "hook_layer": _hook_layer(hook),
        "hook_head_index": None,
        "activation_fn_str": "topk" if k else "relu",
        "activation_fn_kwargs": {"k": k} if k else {},
        "finetuning_scaling_factor": False,
        "context_size": context,
        "prepend_bos": prepend_bos,
        "dataset_path": dataset,
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
    }
    if k:
        cfg["k"] = k
    return cfg


def export_saelens(
    model_dir: str,
    out_dir: str,
    as_topk: bool = False,
    model_name: str | None = None,
    trust_unverified: bool = False,
) -> dict[str, Any]:
    """Write the model trained in `model_dir` (a checkpoint folder: `<train stage>/<model>/`) into
    `out_dir` as SAELens loads it: `cfg.json` + `sae_weights.safetensors`.

    TopK, ReLU and JumpReLU SAEs export as SAELens' "topk", "standard" and "jumprelu" architectures;
    a CompSAE needs `as_topk=True` (its TopK dictionary alone).  The input normalisation is folded
    into the weights (see the module docstring).  `model_name` overrides the LM name found in the
    run's store manifest.  A checkpoint without any content digest is refused unless
    `trust_unverified`.  Returns a summary: out_dir, files, architecture, d_in, d_sae, k, folded
    scale, step."""
    fs, path = fsspec.core.url_to_fs(out_dir.rstrip("/"))
    taken = [f for f in (CFG_FILE, WEIGHTS_FILE) if fs.exists(f"{path}/{f}")]
    if taken or (fs.exists(path) and not fs.isdir(path)):
        raise UserError(
            f"{out_dir} already holds {taken[0] if taken else 'a file of that name'}; compsae does "
            "not "
            "overwrite an export: remove it or choose another --out"
        )
    model, meta = load_model(model_dir, trust_unverified=trust_unverified)
    architecture = _architecture(model, as_topk, model_dir)
    scale = float((meta.get("normalization") or {}).get("scale") or 1.0)
    tensors = saelens_weights(model, scale)
    cfg = saelens_cfg(model, architecture, meta, _harvest_manifest(model_dir), model_name)
    cfg["compsae"] = {  # provenance; SAELens ignores unknown fields
        "checkpoint": model_dir,
        "type": meta.get("type"),
        "step": meta.get("step"),
        "folded_normalization_scale": scale,
        "part": "topk dictionary (composition network left out)"
        if isinstance(model, CompSAE) and model.cfg.composer != "none"
        else "whole model",
    }
    try:
        fs.makedirs(path, exist_ok=True)
        durable.atomic_write(f"{path}/{WEIGHTS_FILE}", st_save(tensors), fs=fs)
        durable.atomic_write(
            f"{path}/{CFG_FILE}", json.dumps(cfg, indent=2, sort_keys=True).encode(), fs=fs
        )
    except (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError) as e:
        raise UserError(
            f"cannot write the export into {out_dir} ({e.__class__.__name__}: {e.strerror or e}); "
            "choose another --out"
        ) from None
    return {
        "out_dir": out_dir,
        "files": [CFG_FILE, WEIGHTS_FILE],
        "architecture": architecture,
        "d_in": cfg["d_in"],
        "d_sae": cfg["d_sae"],
        "k": cfg.get("k"),
        "normalization_scale": scale,
        "step": meta.get("step"),
    }
