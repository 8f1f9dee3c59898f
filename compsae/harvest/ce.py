"""Next-token cross-entropy of the harvested LM with a hook's activation replaced (for CE / KL
scores).

The analysis stage splices a reconstruction x̂ (or zeros) in at the hook and compares the LM's
loss with the clean run; this module rebuilds the LM a store was harvested from, from its manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from compsae.errors import UserError
from compsae.harvest.config import HarvestConfig

Replace = Callable[[torch.Tensor], torch.Tensor]
CEFn = Callable[[torch.Tensor, Replace | None], tuple[torch.Tensor, torch.Tensor]]


def harvest_config_from_manifest(manifest: dict[str, Any], hook: str) -> HarvestConfig:
    """The part of a HarvestConfig that reloads the store's model (on the CPU or CUDA)."""
    info = manifest.get("model") or {}
    name = info.get("name")
    if not name or info.get("source") == "synthetic":
        raise UserError("this store was not harvested from a language model; CE metrics need one")
    return HarvestConfig(
        model=name,
        model_seed=int(info.get("seed", 0) or 0),
        revision=info.get("revision"),
        weight_processing=bool(info.get("processing", False)),
        hooks=[hook],
        context=int(manifest.get("context", 128)),
        prepend_bos=bool(manifest.get("prepend_bos", True)),
    )


def make_ce_fn(manifest: dict[str, Any], hook: str) -> CEFn:
    """`ce_fn(tokens [b, ctx], replace) -> (ce [b, ctx-1], logits [b, ctx, vocab])`.

    `replace` maps the hook's activation `[b, ctx, d]` to what the model should continue with
    (x̂, zeros); None runs the model clean."""
    from compsae.lm.models import load_model

    loaded = load_model(harvest_config_from_manifest(manifest, hook))
    model = loaded.model
    if hook not in loaded.hook_names():
        raise UserError(
            f"hook {hook} not found in {loaded.info.get('name')} when reloading it for CE"
        )

    @torch.inference_mode()
    def ce_fn(tokens: torch.Tensor, replace: Replace | None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens.to(loaded.device)
        if replace is None:
            logits = model(tokens, return_type="logits")
        else:

            def splice(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
                return replace(act).to(act.dtype)

            logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook, splice)])
        logits = logits.float()
        ce = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none"
        )
        return ce.view(tokens.shape[0], -1).cpu(), logits.cpu()

    return ce_fn
