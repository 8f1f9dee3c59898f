"""The unembedding of the LM a store was harvested from, for the feature browser's logit effects."""

from __future__ import annotations

from typing import Any

import numpy as np

from compsae.errors import UserError


def unembedding(manifest: dict[str, Any], hook: str) -> np.ndarray:
    """`W_U: [d_model, vocab]` float32 of the store's LM, reloaded from its manifest.

    Only a residual-stream hook writes into the space W_U reads (the final layer norm aside, as in
    direct logit attribution); other hooks raise UserError, as does an LM that cannot be loaded."""
    if "resid" not in hook:
        raise UserError(
            f"{hook} is not a residual-stream hook: its directions do not map to logits through W_U"
        )
    from compsae.harvest.ce import harvest_config_from_manifest
    from compsae.lm.models import load_model

    cfg = harvest_config_from_manifest(manifest, hook).model_copy(update={"device": "cpu"})
    w_u = getattr(load_model(cfg).model, "W_U", None)
    if w_u is None:
        raise UserError(f"the LM {cfg.model} exposes no W_U")
    return w_u.detach().float().cpu().numpy()
