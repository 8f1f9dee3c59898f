"""Write the feature browser: `browser/<model>.html` in the analyze folder, one page per trained
(or imported) SAE, from the tables analysis wrote and two small passes of each model."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from compsae.analysis.browser_data import browser_data
from compsae.analysis.browser_page import render_browser
from compsae.analysis.views import CompositionView
from compsae.files import BROWSER_DIR
from compsae.store import ActivationStore


def load_unembedding(manifest: dict[str, Any], hook: str) -> tuple[np.ndarray | None, str]:
    """The LM's `W_U [d, vocab]`, or (None, why the logit effects are left out)."""
    try:
        from compsae.harvest.unembedding import unembedding

        return unembedding(manifest, hook), ""
    except Exception as e:  # noqa: BLE001 - logit effects are optional; everything else still shows
        return (
            None,
            "logit effects left out: "
            f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__}",
        )


def codes_fn(rec: Any) -> Callable[[np.ndarray], np.ndarray]:
    """`x [m, d]` (store units) -> the dictionary codes `z [m, n]` (store units) of an SAE
    reconstructor.  For top-k models (CompSAE included) only the top-k step runs: the codes do not
    depend on the composition path, which would cost most of a CompSAE forward."""
    import torch

    from compsae.train.models import TopKSAE
    from compsae.train.models.topk import dense_codes

    model, scale = rec.model, float(rec.scale)

    @torch.no_grad()
    def encode(x: np.ndarray) -> np.ndarray:
        xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)) * scale
        if isinstance(model, TopKSAE):
            _, idx, vals = model.active(xt)
            z = dense_codes(idx, vals, model.cfg.n_latents)
        else:
            z = model(xt).z
        return z.float().numpy() / scale

    return encode


def sample_heldout(keep: np.ndarray, n: int) -> np.ndarray:
    """Up to `n` evaluated rows (`keep: [n_rows]` bool), spread evenly over them."""
    rows = np.flatnonzero(keep)
    if len(rows) <= n:
        return rows
    return rows[np.unique(np.linspace(0, len(rows) - 1, n).astype(np.int64))]


def model_view(rec: Any, arrays: dict[str, Any]) -> CompositionView:
    """What one SAE's composition numbers are: its kind, its composer (a CompSAE's config) and the
    pair matrix analysis wrote for it."""
    cfg = getattr(rec.model, "cfg", None)
    composer = getattr(cfg, "composer", None) if rec.kind == "compsae" else None
    matrix = (
        "pair_effect" if "pair_effect" in arrays else ("attention" if "comp" in arrays else None)
    )
    pair = composer == "pair"
    return CompositionView(
        rec.kind,
        composer,
        matrix,
        bool(getattr(cfg, "gate", False)),
        getattr(cfg, "pair_selection", None) if pair else None,
        getattr(cfg, "pair_fit", None) if pair else None,
    )


def write_browsers(
    work: str,
    saes: list[Any],
    latents: pd.DataFrame,
    tops: pd.DataFrame,
    arrays: dict[str, dict[str, Any]],
    store: ActivationStore,
    hook: str,
    keep: np.ndarray,
    decode: Callable[[int], str],
    per_latent: int,
    window: int,
    hist_rows: int,
    after: int = 0,
    partners_shown: int = 10,
    pairs: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, str]:
    """One page per SAE reconstructor in `saes` into `<work>/browser/`; returns name -> relative
    path.

        `latents` / `tops`: latents.parquet / top_contexts.parquet of every model; `keep`: the
        evaluated held-out rows (the histograms sample them); `after`: tokens shown after each
        context's centre; `partners_shown`: composition partners listed per latent; `pairs`: model
        -> its profiled top pairs (`metrics.models.<m>.pairs.top_pairs`), one pair page each."""
    os.makedirs(os.path.join(work, BROWSER_DIR), exist_ok=True)
    w_u, why = load_unembedding(store.manifest, hook)
    sample = sample_heldout(keep, hist_rows)
    pages = {}
    for rec in saes:
        model = rec.model
        w_dec = model.W_dec.detach().float().cpu().numpy() if w_u is not None else None
        notes = [why] if why else []
        if w_dec is not None and w_u is not None and w_dec.shape[1] != w_u.shape[0]:
            notes.append(
                f"logit effects left out: decoder width {w_dec.shape[1]} is not the LM's d_model "
                f"{w_u.shape[0]}"
            )
            w_dec = None
        data = browser_data(
            rec.name,
            rec.kind,
            codes_fn(rec),
            store,
            hook,
            latents[latents["model"] == rec.name] if len(latents) else latents,
            tops[tops["model"] == rec.name] if len(tops) else tops,
            arrays.get(rec.name, {}),
            decode,
            sample,
            w_dec=w_dec,
            w_u=w_u,
            per_latent=per_latent,
            window=window,
            n_tokens=int(keep.sum()),
            notes=notes,
            after=after,
            partners_shown=partners_shown,
            view=model_view(rec, arrays.get(rec.name, {})),
            pairs=(pairs or {}).get(rec.name),
        )
        rel = f"{BROWSER_DIR}/{rec.name}.html"
        with open(os.path.join(work, rel), "w", encoding="utf-8") as f:
            f.write(render_browser(data))
        pages[rec.name] = rel
    return pages
