"""Score trained dictionaries against a synthetic ground truth: the method comparison table.

For each checkpoint on its ground-truth store: MCC and MMCS of the decoder rows against the true
base directions V (and against V ∪ U, the interaction directions included), FVU on held-out rows,
L0, and for CompSAE the FVU with the composition path switched off, the composition path's share
of explained variance, and recovery of the interaction set C from its composition matrix.

Composition matrix (CompSAE): ``S[i, j]`` = mean attention weight from active latent i to active
latent j over the held-out tokens where both are active (heads averaged).  Attention is only a
proxy (docs/metrics.md: evidence needs an intervention), so the table reports it next to the
composition share, and the additive-only control is the check that it does not invent pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import torch
from tqdm.auto import tqdm

from compsae.analysis.pair_effects import PairEffectSums, typical_code_effects
from compsae.evaluation.comparison.config import EvaluateConfig
from compsae.evaluation.ground_truth.design import GroundTruth, load_ground_truth
from compsae.evaluation.ground_truth.matching import hungarian_match, mmcs
from compsae.evaluation.ground_truth.pair_recovery import (
    conjunction_latent_score,
    labelled_auc,
    labelled_scores,
    pair_recovery,
    thresholded_pairs,
    true_pairs,
)
from compsae.figures import log_axis, plain_text, pyplot
from compsae.store import ActivationStore
from compsae.store.split import HeldOutSplit
from compsae.variance import FVUAccumulator


def eval_rows(store: ActivationStore, split: HeldOutSplit, max_rows: int) -> np.ndarray:
    """Row indices of the ``split``'s held-out sequences (the ones the model never trained on),
    capped at ``max_rows``: [n]."""
    return np.flatnonzero(split.store_mask(store))[:max_rows]


def iter_batches(
    store: ActivationStore, hook: str, rows: np.ndarray, batch_size: int
) -> Iterator[np.ndarray]:
    """Activations of ``rows`` in order, ``[≤ batch_size, d]`` float32 at a time (contiguous runs
    read at once)."""
    for i in range(0, len(rows), batch_size):
        r = rows[i : i + batch_size]
        lo, hi = int(r.min()), int(r.max()) + 1
        yield store.read_rows(hook, lo, hi)[r - lo]


class CompositionAccumulator:
    """Mean attention between co-active latents: ``S [n, n]`` from ``attn [b, heads, k, k]`` and
    ``active_idx [b, k]``."""

    def __init__(self, n_latents: int) -> None:
        self.n = n_latents
        self.total = torch.zeros(n_latents * n_latents, dtype=torch.float64)
        self.count = torch.zeros(n_latents * n_latents, dtype=torch.float64)

    def update(self, attn: torch.Tensor, active_idx: torch.Tensor) -> None:
        w = attn.detach().double().mean(dim=1).cpu()  # [b, k, k] heads averaged
        idx = active_idx.detach().long().cpu()  # [b, k]
        flat = (idx[:, :, None] * self.n + idx[:, None, :]).reshape(
            -1
        )  # [b*k*k] (query, key) pairs
        self.total.index_add_(0, flat, w.reshape(-1))
        self.count.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))

    def matrix(self) -> np.ndarray:
        S = (self.total / self.count.clamp_min(1)).reshape(self.n, self.n).numpy()
        np.fill_diagonal(S, 0.0)
        return S


def _forward(model: Any, x: torch.Tensor, composition: bool | None) -> Any:
    return model(x) if composition is None else model(x, composition=composition)


def interaction_terms(gt: GroundTruth, acts: np.ndarray, would: bool = False) -> np.ndarray:
    """The interaction part of each row, `acts: [rows, n_features]` -> `[rows, d]` (what the
    generator added; with `would`, what it would have added on the additive control)."""
    d = gt.dictionary
    if not (d.interacting or would) or not len(d.groups):
        return np.zeros((acts.shape[0], d.V.shape[1]), dtype=np.float32)
    if d.kind == "bilinear":
        return d.bilinear(acts)
    member = d.membership
    active = ((acts > 0).astype(np.int32) @ member.T.astype(np.int32)) == member.sum(1)
    return (active * d.b).astype(np.float32) @ d.U


def _interacts(gt: GroundTruth) -> Any:
    """`(i, j) -> bool`: whether two true features interact in (or, on the control, would interact
    in) the data."""
    d = gt.dictionary
    if d.kind == "bilinear":
        return d.would_interact
    pairs = true_pairs(d.groups)
    return lambda i, j: (min(i, j), max(i, j)) in pairs


def _labelled_pairs(gt: GroundTruth) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(interacting, co-firing-only) labelled pairs: the bilinear design's pairs and twins."""
    d = gt.dictionary
    if d.kind != "bilinear":
        return [], []
    return [tuple(p) for p in d.groups[: d.n_pairs]], [tuple(p) for p in d.twins]  # type: ignore[misc]


def pmi_matrix(count: np.ndarray, fired: np.ndarray, n_tokens: int, min_support: int) -> np.ndarray:
    """Pointwise mutual information of latent co-firing `[n, n]` (0 below `min_support`), shifted to
    be non-negative so it ranks like a score: `count` (upper-triangular pair counts), `fired: [n]`
    counts."""
    both = count + count.T
    p_i = fired / max(n_tokens, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(both / max(n_tokens, 1) / np.outer(p_i, p_i))
    pmi = np.where((both >= min_support) & np.isfinite(pmi), pmi, np.nan)
    lowest = np.nanmin(pmi) if np.isfinite(pmi).any() else 0.0
    return np.nan_to_num(pmi - lowest + 1e-9, nan=0.0)


@torch.no_grad()
def evaluate_model(
    model: Any,
    store: ActivationStore,
    hook: str,
    gt: GroundTruth,
    cfg: EvaluateConfig,
    split: HeldOutSplit,
    scale: float = 1.0,
) -> dict[str, float]:
    """All synthetic-ground-truth metrics of one trained model (``W_dec: [n, d]``, SAE interface),
    on the held-out rows of ``split`` (the one it was trained with).

    Composition is scored from measured pair effects (``PairEffectSums``: the mixed difference of
    the reconstruction over the tokens where both latents fire), never from attention weights; the
    attention-weight matrix is reported beside it as ``attn_*``, a secondary view."""
    model.eval()
    W_dec = model.W_dec.detach().float().cpu().numpy()  # [n_latents, d]
    n_latents = W_dec.shape[0]
    match = hungarian_match(W_dec, gt.V)
    latent_to_true = match.latent_to_true(cfg.min_match_cos)
    true_all = np.concatenate([gt.V, gt.U]) if len(gt.U) else gt.V
    comp = bool(model.has_composition)
    rows = eval_rows(store, split, cfg.max_rows)
    acts = gt.acts[rows].toarray()  # [rows, n_features] true magnitudes of the evaluated rows
    inter = interaction_terms(gt, acts) * scale  # [rows, d] in the model's units
    positives, negatives = _labelled_pairs(gt)
    conj = (
        np.stack([(acts[:, i] > 0) & (acts[:, j] > 0) for i, j in positives], 1)
        if positives
        else None
    )
    fvu_on, fvu_off = FVUAccumulator(), FVUAccumulator()
    attn_acc = CompositionAccumulator(n_latents) if comp else None
    effects = PairEffectSums.empty(n_latents) if comp else None
    cofire = np.zeros((n_latents, n_latents))
    fired = np.zeros(n_latents)
    code_sum = torch.zeros(n_latents, dtype=torch.float64)
    left, inter_energy, l0, n_tok = 0.0, 0.0, 0.0, 0
    z_fired = []
    for lo, batch in enumerate(
        tqdm(
            iter_batches(store, hook, rows, cfg.batch_size),
            total=-(-len(rows) // cfg.batch_size),
            desc="evaluate",
            unit="batch",
        )
    ):
        x = torch.from_numpy(batch).to(cfg.device) * scale
        out = _forward(model, x, True if comp else None)
        fvu_on.update(x, out.x_hat)
        active = (out.z != 0).cpu().numpy()
        l0 += float(active.sum())
        n_tok += x.shape[0]
        fired += active.sum(0)
        code_sum += out.z.double().sum(0).cpu()
        cofire += np.triu(active.T.astype(np.float64) @ active.astype(np.float64), 1)
        if conj is not None:
            z_fired.append(active)
        # interaction energy the model leaves in its residual: (⟨x − x̂, t⟩ / ‖t‖)² summed over rows
        t = torch.from_numpy(inter[lo * cfg.batch_size : lo * cfg.batch_size + x.shape[0]]).to(x)
        t_sq = t.square().sum(-1)
        has = t_sq > 0
        left += float((((x - out.x_hat) * t).sum(-1)[has]).square().div(t_sq[has]).sum())
        inter_energy += float(t_sq.sum())
        if comp:
            fvu_off.update(x, _forward(model, x, False).x_hat)
            idx = out.active_idx
            effects.update(model, x, out.x_hat, idx, out.z.gather(1, idx))  # type: ignore[union-attr]
            if out.attn is not None:
                attn_acc.update(out.attn, idx)  # type: ignore[union-attr]
    res: dict[str, float] = {
        "mcc": match.mcc,
        "mmcs": mmcs(W_dec, gt.V),
        "mcc_with_interactions": hungarian_match(W_dec, true_all).mcc,
        "fvu": fvu_on.fvu,
        "l0": l0 / max(n_tok, 1),
        "n_eval_rows": int(n_tok),
    }
    if inter_energy > 0:
        res["interaction_left"] = left / inter_energy
    if conj is not None:
        res["conjunction_latent_f1"] = float(
            conjunction_latent_score(np.concatenate(z_fired), conj).mean()
        )
    if positives:
        pmi = pmi_matrix(cofire, fired, n_tok, cfg.min_pair_support)
        res["pmi_auc"] = labelled_auc(pmi, latent_to_true, positives, negatives)[0]
    if not comp:
        return res
    fve_on, fve_off = 1 - fvu_on.fvu, 1 - fvu_off.fvu
    res.update(
        fvu_no_composition=fvu_off.fvu,
        composition_share=(fve_on - fve_off) / fve_on if fve_on > 0 else float("nan"),
    )
    # The headline pair score: each pair's mixed difference with only its two latents active, at
    # their typical (mean firing) codes; the same effect averaged over the tokens where both fire
    # is reported beside it ("in_context"): it is 0 for pairs that seldom fire together and carries
    # the other active latents' noise.
    codes = code_sum / torch.from_numpy(np.maximum(fired, 1))
    S = typical_code_effects(model, codes, effects.rms)  # type: ignore[union-attr]
    S_ctx = effects.mean_effect(cfg.min_pair_support)  # type: ignore[union-attr]
    prefix = "pair_" if gt.C else "spurious_pair_"
    if positives:
        res[prefix + "auc"], res[prefix + "ap"] = labelled_auc(
            S, latent_to_true, positives, negatives
        )
        res[prefix + "auc_in_context"] = labelled_auc(S_ctx, latent_to_true, positives, negatives)[
            0
        ]
        pos_s, neg_s = labelled_scores(S, latent_to_true, positives, negatives)
        res[prefix + "scores"] = {"interacting": pos_s.tolist(), "co_firing_only": neg_s.tolist()}
    if len(gt.dictionary.groups):
        # On the additive control nothing interacts: every pair called composing is false, scored
        # against what would interact, so its F1 measures the spurious compositions.
        called = thresholded_pairs(
            S,
            effects.count,
            latent_to_true,
            _interacts(gt),  # type: ignore[union-attr]
            cfg.min_pair_support,
            cfg.min_pair_effect,
        )
        res.update({prefix + k: v for k, v in called.as_dict().items()})
        in_ctx = thresholded_pairs(
            S_ctx,
            effects.count,
            latent_to_true,
            _interacts(gt),  # type: ignore[union-attr]
            cfg.min_pair_support,
            cfg.min_pair_effect,
        )
        res[prefix + "f1_in_context"] = in_ctx.f1
        if attn_acc is not None and attn_acc.count.sum() > 0:
            A = attn_acc.matrix()
            if positives:
                res["attn_" + prefix + "auc"] = labelled_auc(
                    A, latent_to_true, positives, negatives
                )[0]
            else:
                pr = pair_recovery(
                    A,
                    gt.C or gt.dictionary.groups,
                    latent_to_true,
                    selection=cfg.pair_selection,
                    threshold=cfg.pair_threshold,
                )
                res["attn_" + prefix + "f1"] = pr.f1
    return res


@plain_text
def pair_score_figure(rows: list[dict], path: str) -> bool:
    """Strip plot of the headline pair score of the labelled interacting pairs and of their
    co-firing-only twins, one column pair per composition model, with the call threshold; written
    to `path` (PNG).  False (nothing written) when no row has labelled pair scores."""
    scored = [r for r in rows if isinstance(r.get("pair_scores"), dict)]
    if not scored:
        return False
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 1.4 * len(scored)), 3.8))
    floor = 1e-5  # log axis: a score of 0 (unmatched or no effect) is drawn at the floor
    rng = np.random.default_rng(0)
    for i, r in enumerate(scored):
        for dx, key, color in (
            (-0.18, "interacting", "tab:red"),
            (0.18, "co_firing_only", "tab:gray"),
        ):
            y = np.maximum(np.asarray(r["pair_scores"][key], dtype=float), floor)
            ax.scatter(
                i + dx + rng.uniform(-0.07, 0.07, len(y)),
                y,
                s=12,
                color=color,
                alpha=0.8,
                label=key.replace("_", "-") if i == 0 else None,
            )
        t = r.get("pair_threshold")
        if isinstance(t, float) and np.isfinite(t):
            ax.hlines(
                max(t, floor), i - 0.35, i + 0.35, colors="k", linestyles="dashed", linewidth=1
            )
    log_axis(ax, "y")
    ax.set_xticks(
        range(len(scored)),
        [f"{r['label']}\nAUC {r.get('pair_auc', float('nan')):.3f}" for r in scored],
    )
    ax.set_ylabel("pair effect / RMS (two latents, typical codes)")
    ax.set_title("labelled pairs (dashed: call threshold)", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    with fsspec.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return True


def comparison_table(
    runs: list[dict[str, str]], cfg: EvaluateConfig, trust_unverified: bool = False
) -> list[dict]:
    """One row per run ``{"label", "checkpoint", "store"}``: load (a checkpoint without any
    content digest only with ``trust_unverified``), evaluate, tag with the data kind."""
    from compsae.train.trained import TrainedSAE

    rows = []
    for run in runs:
        sae = TrainedSAE.load(run["checkpoint"], cfg.device, trust_unverified=trust_unverified)
        store = ActivationStore.open(run["store"])
        gt = load_ground_truth(run["store"])
        res = evaluate_model(
            sae.model,
            store,
            sae.hook or store.hooks[0],
            gt,
            cfg,
            sae.split or HeldOutSplit(),
            sae.scale,
        )
        rows.append(
            {
                "label": run["label"],
                "model": type(sae.model).__name__,
                "data": "interactions" if gt.C else "additive-only",
                **res,
            }
        )
    return rows


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of result rows (floats to 3 significant digits, missing as "–")."""
    columns = columns or [
        "label",
        "model",
        "data",
        "mcc",
        "fvu",
        "fvu_no_composition",
        "composition_share",
        "pair_auc",
        "pair_auc_in_context",
        "pmi_auc",
        "pair_f1",
        "pair_precision",
        "pair_recall",
        "pair_f1_in_context",
        "spurious_pair_f1",
        "spurious_pair_n_found",
        "conjunction_latent_f1",
        "interaction_left",
        "l0",
    ]
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
