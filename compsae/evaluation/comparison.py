"""Score trained dictionaries against a synthetic ground truth: the method comparison table.

For each checkpoint on its ground-truth store: MCC and MMCS of the decoder rows against the true
base directions V (and against V ∪ U, the interaction directions included), FVU on held-out rows,
L0, and for CompSAE the FVU with the composition path switched off, the composition path's share
of explained variance, and recovery of the interaction set C from its composition matrix.

Composition matrix (CompSAE): ``S[i, j]`` = mean attention weight from active latent i to active
latent j over the held-out tokens where both are active (heads averaged).  Attention is only a
proxy (docs/science.md: evidence needs an intervention), so the table reports it next to the
composition share, and the additive-only control is the check that it does not invent pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from compsae.evaluation.config import EvaluateConfig
from compsae.evaluation.ground_truth import GroundTruth, load_ground_truth
from compsae.evaluation.matching import hungarian_match, mmcs
from compsae.evaluation.pair_recovery import pair_recovery
from compsae.evaluation.reconstruction import FVUAccumulator
from compsae.store import ActivationStore
from compsae.store.split import HeldOutSplit


def eval_rows(store: ActivationStore, split: HeldOutSplit, max_rows: int) -> np.ndarray:
    """Row indices of the ``split``'s held-out sequences (the ones the model never trained on),
    capped at ``max_rows``: [n]."""
    return np.flatnonzero(split.mask(store.seq_id))[:max_rows]


def iter_batches(store: ActivationStore, hook: str, rows: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Activations of ``rows`` in order, ``[≤ batch_size, d]`` float32 at a time (contiguous runs read at once)."""
    for i in range(0, len(rows), batch_size):
        r = rows[i:i + batch_size]
        lo, hi = int(r.min()), int(r.max()) + 1
        yield store.read_rows(hook, lo, hi)[r - lo]


class CompositionAccumulator:
    """Mean attention between co-active latents: ``S [n, n]`` from ``attn [b, heads, k, k]`` and ``active_idx [b, k]``."""

    def __init__(self, n_latents: int) -> None:
        self.n = n_latents
        self.total = torch.zeros(n_latents * n_latents, dtype=torch.float64)
        self.count = torch.zeros(n_latents * n_latents, dtype=torch.float64)

    def update(self, attn: torch.Tensor, active_idx: torch.Tensor) -> None:
        w = attn.detach().double().mean(dim=1).cpu()          # [b, k, k] heads averaged
        idx = active_idx.detach().long().cpu()                 # [b, k]
        flat = (idx[:, :, None] * self.n + idx[:, None, :]).reshape(-1)  # [b*k*k] (query, key) pairs
        self.total.index_add_(0, flat, w.reshape(-1))
        self.count.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))

    def matrix(self) -> np.ndarray:
        S = (self.total / self.count.clamp_min(1)).reshape(self.n, self.n).numpy()
        np.fill_diagonal(S, 0.0)
        return S


def _forward(model: Any, x: torch.Tensor, composition: bool | None) -> Any:
    return model(x) if composition is None else model(x, composition=composition)


def _has_composition(model: Any) -> bool:
    import inspect

    return "composition" in inspect.signature(model.forward).parameters


@torch.no_grad()
def evaluate_model(model: Any, store: ActivationStore, hook: str, gt: GroundTruth, cfg: EvaluateConfig,
                   split: HeldOutSplit, scale: float = 1.0) -> dict[str, float]:
    """All synthetic-ground-truth metrics of one trained model (``W_dec: [n, d]``, SAE interface),
    on the held-out rows of ``split`` (the one it was trained with)."""
    model.eval()
    W_dec = model.W_dec.detach().float().cpu().numpy()   # [n_latents, d]
    match = hungarian_match(W_dec, gt.V)
    true_all = np.concatenate([gt.V, gt.U]) if len(gt.C) else gt.V
    comp = _has_composition(model)
    rows = eval_rows(store, split, cfg.max_rows)
    fvu_on, fvu_off = FVUAccumulator(), FVUAccumulator()
    acc = CompositionAccumulator(W_dec.shape[0]) if comp else None
    l0, n_tok = 0.0, 0
    for batch in tqdm(iter_batches(store, hook, rows, cfg.batch_size), total=-(-len(rows) // cfg.batch_size),
                      desc="evaluate", unit="batch"):
        x = torch.from_numpy(batch).to(cfg.device) * scale
        out = _forward(model, x, True if comp else None)
        fvu_on.update(x, out.x_hat)
        l0 += float((out.z != 0).sum())
        n_tok += x.shape[0]
        if comp:
            fvu_off.update(x, _forward(model, x, False).x_hat)
            if out.attn is not None and "active_idx" in out.extras:
                acc.update(out.attn, out.extras["active_idx"])
    res: dict[str, float] = {
        "mcc": match.mcc, "mmcs": mmcs(W_dec, gt.V), "mcc_with_interactions": hungarian_match(W_dec, true_all).mcc,
        "fvu": fvu_on.fvu, "l0": l0 / max(n_tok, 1), "n_eval_rows": int(n_tok),
    }
    if comp:
        fve_on, fve_off = 1 - fvu_on.fvu, 1 - fvu_off.fvu
        res.update(fvu_no_composition=fvu_off.fvu,
                   composition_share=(fve_on - fve_off) / fve_on if fve_on > 0 else float("nan"))
        if acc is not None and len(gt.dictionary.groups):
            # On the additive control C is empty: score against the co-firing groups instead, which
            # measures how many spurious "compositions" the model reports where none exist.
            C = gt.C if gt.C else gt.dictionary.groups
            pr = pair_recovery(acc.matrix(), C, match.latent_to_true(cfg.min_match_cos),
                               selection=cfg.pair_selection, threshold=cfg.pair_threshold)
            prefix = "pair_" if gt.C else "spurious_pair_"
            res.update({prefix + k: v for k, v in pr.as_dict().items()})
    return res


def comparison_table(runs: list[dict[str, str]], cfg: EvaluateConfig) -> list[dict]:
    """One row per run ``{"label", "checkpoint", "store"}``: load, evaluate, tag with the data kind."""
    from compsae.train.checkpoint import load_model, parse_meta

    rows = []
    for run in runs:
        model, meta = load_model(run["checkpoint"])
        model.to(cfg.device)
        if hasattr(model, "reset_schedule"):
            model.reset_schedule()
        store = ActivationStore.open(run["store"])
        gt = load_ground_truth(run["store"])
        norm = meta.get("normalization") or {}
        res = evaluate_model(model, store, meta.get("hook") or store.hooks[0], gt, cfg,
                             parse_meta(meta, run["checkpoint"]).split or HeldOutSplit(), float(norm.get("scale", 1.0)))
        rows.append({"label": run["label"], "model": type(model).__name__,
                     "data": "interactions" if gt.C else "additive-only", **res})
    return rows


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of result rows (floats to 3 significant digits, missing as "–")."""
    columns = columns or ["label", "model", "data", "mcc", "mmcs", "fvu", "fvu_no_composition",
                          "composition_share", "pair_f1", "pair_precision", "pair_recall", "spurious_pair_precision", "l0"]
    columns = [c for c in columns if any(c in r for r in rows)]

    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return "–" if np.isnan(v) else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
