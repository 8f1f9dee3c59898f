"""Merged partials -> the numbers of the report: one metrics dict per model and per-latent
tables."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from compsae.analysis.composition import (
    PairSums,
    composition_matrix,
    partner_stats,
    rank_correlation,
)
from compsae.analysis.cooccurrence import jaccard, npmi, pmi
from compsae.analysis.pair_calls import call_pairs
from compsae.analysis.pair_effects import PairEffectSums
from compsae.analysis.reconstruction import LatentSums
from compsae.analysis.views import ATTENTION_SOURCE, PAIR_EFFECT_SOURCE

if (
    TYPE_CHECKING
):  # pandas is imported where a table is built: every stage's pipeline report imports this module
    import pandas as pd

TOP_PAIRS = 20  # composing pairs listed in metrics.json and the report


def _finite(v: Any) -> Any:
    """JSON-safe scalar: NaN / inf become None."""
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def json_safe(node: Any) -> Any:
    """Nested dicts/lists with numpy scalars and NaN turned into plain JSON values."""
    if isinstance(node, dict):
        return {str(k): json_safe(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [json_safe(v) for v in node]
    if isinstance(node, np.ndarray):
        return json_safe(node.tolist())
    return _finite(node)


def model_metrics(
    part: dict[str, Any],
    dense_thresholds: list[float],
    partner_threshold: float,
    tracked: np.ndarray | None,
    pair_fdr: float | None = None,
    pair_min_support: int = 5,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, arrays) of one model.  metrics: JSON-able numbers (reconstruction on all / BOS /
    non-BOS tokens, latent health, heads, gate, pair summaries and, with `pair_fdr`, the
    label-free pair calls); arrays: what the figures and the per-latent table need (composition
    matrix, partner counts, ...)."""
    both = part["bos"].merge(part["rest"])
    m: dict[str, Any] = {
        "all": both.summary(),
        "bos": part["bos"].summary(),
        "rest": part["rest"].summary(),
    }
    arrays: dict[str, Any] = {}
    lat: LatentSums | None = part.get("latents")
    if lat is not None:
        m["latents"] = lat.summary(dense_thresholds)
        arrays["latents"] = lat
    if part.get("heads") is not None:
        m["heads"] = part["heads"].summary()
    if part.get("gate") is not None:
        m["gate"] = part["gate"].summary()
    pairs, effects = part.get("pairs"), part.get("effects")
    if tracked is not None and (pairs is not None or effects is not None):
        # single-latent counts over the rows the pair counts cover (sequence starts may be out)
        pair_lat = part.get("pair_latents", lat)
        m["pairs"], pair_arrays = pair_metrics(pairs, effects, pair_lat, tracked, partner_threshold)
        arrays.update(pair_arrays)
        null = part.get("null_effects")
        if effects is not None and null is not None and pair_fdr is not None:
            add_pair_calls(m["pairs"], arrays, effects, null, tracked, pair_fdr, pair_min_support)
    return m, arrays


def pair_metrics(
    pairs: PairSums | None,
    effects: PairEffectSums | None,
    lat: LatentSums | None,
    tracked: np.ndarray,
    partner_threshold: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pair summaries and arrays over the tracked latents.  The composition matrix is the mean
    pair effect (mixed difference, `PairEffectSums`) where it was measured; attention weights stay a
    secondary view (`comp_attention`).  Partners and their statistics come from the same matrix."""
    off = ~np.eye(len(tracked), dtype=bool)
    arrays: dict[str, Any] = {"tracked": tracked}
    if effects is not None:
        co = (effects.count + effects.count.T).astype(np.float64)
        single = (lat.fire[tracked] if lat is not None else co.max(1)).astype(np.float64)
        np.fill_diagonal(co, single)
        n_tokens = effects.n_tokens
        comp = np.where(co > 0, effects.mean_effect(), np.nan)
        np.fill_diagonal(comp, np.nan)
        ps = partner_stats(
            effects.norm + effects.norm.T, np.arange(len(tracked)), partner_threshold
        )
        gain = effects.gain_share()
        arrays.update(pair_effect=comp, pair_gain=gain)
        source = PAIR_EFFECT_SOURCE
        lists = partner_lists(
            effects.norm + effects.norm.T, np.nan_to_num(comp), tracked, tracked, partner_threshold
        )
    else:
        assert pairs is not None
        co, single, n_tokens = (
            pairs.co.astype(np.float64),
            np.diag(pairs.co).astype(np.float64),
            pairs.n_tokens,
        )
        comp = composition_matrix(pairs, tracked)
        ps = partner_stats(pairs.attn_to, tracked, partner_threshold)
        gain = None
        source = ATTENTION_SOURCE
        ids = np.arange(pairs.attn_to.shape[1])
        lists = partner_lists(pairs.attn_to, None, tracked, ids, partner_threshold)
    co_nan = np.where(co > 0, co, np.nan)
    npmi_m = np.where(co > 0, npmi(single, co, n_tokens), np.nan)
    pmi_m = np.where(co > 0, pmi(single, co, n_tokens), np.nan)
    summary: dict[str, Any] = {
        "matrix": source,
        "n_tracked": len(tracked),
        "n_tokens": n_tokens,
        "pairs_cooccurring": int((co[off] > 0).sum()),
        "mean_npmi": float(np.nanmean(npmi_m[off]))
        if np.isfinite(npmi_m[off]).any()
        else float("nan"),
        "mean_jaccard": float(jaccard(single, co)[off].mean()) if off.any() else float("nan"),
        "spearman_comp_vs_cooccurrence": rank_correlation(comp, co_nan),
        "spearman_comp_vs_npmi": rank_correlation(comp, npmi_m),
        "spearman_comp_vs_pmi": rank_correlation(comp, pmi_m),
        "partners_mean": float(np.mean(ps["n_partners"])),
        "partners_median": float(np.median(ps["n_partners"])),
        "partner_entropy_mean": _nanmean(ps["partner_entropy"]),
        "partner_gini_mean": _nanmean(ps["attn_gini"]),
    }
    if gain is not None:
        iu = np.triu_indices(len(tracked), k=1)
        summary["pair_gain_total"] = float(
            gain[iu].sum()
        )  # share of the variance the pair terms explain
        order = np.argsort(-gain[iu])[:TOP_PAIRS]
        summary["top_pairs"] = [
            {
                "i": int(tracked[iu[0][o]]),
                "j": int(tracked[iu[1][o]]),
                "tokens": int(co[iu[0][o], iu[1][o]]),
                "mean_effect": float(comp[iu[0][o], iu[1][o]]),
                "gain_share": float(gain[iu][o]),
            }
            for o in order
            if gain[iu][o] > 0
        ]
    if pairs is not None and effects is not None:
        comp_attention = composition_matrix(pairs, tracked)
        arrays["comp_attention"] = comp_attention
        summary["spearman_attention_vs_effect"] = rank_correlation(comp_attention, comp)
        summary["spearman_attention_vs_pmi"] = rank_correlation(comp_attention, pmi_m)
    arrays.update(
        comp=comp,
        cooccurrence=co,
        npmi=npmi_m,
        pmi=pmi_m,
        jaccard=jaccard(single, co),
        partners=ps,
        partner_lists=lists,
    )
    return summary, arrays


def partner_lists(
    mass: np.ndarray,
    score: np.ndarray | None,
    row_ids: np.ndarray,
    col_ids: np.ndarray,
    threshold: float,
) -> dict[int, list[tuple[int, float, float]]]:
    """Each row latent's partners, the latents counted in its `n_partners` (`partner_stats`: share
    of its mass `mass: [m, c]` ≥ `threshold`), as `(partner, score, share)` strongest first by
    `score: [m, c]` (the mean pair effect; None: by share), ties to the lower latent.  Latents
    without partners are left out.  `row_ids` / `col_ids`: the latent of each row / column."""
    total = mass.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, mass / np.where(total > 0, total, 1.0), 0.0)
    key = share if score is None else score
    out: dict[int, list[tuple[int, float, float]]] = {}
    for r, lat in enumerate(row_ids):
        cols = np.flatnonzero(share[r] >= threshold)
        if cols.size == 0:
            continue
        cols = cols[np.lexsort((col_ids[cols], -key[r, cols]))]
        out[int(lat)] = [(int(col_ids[c]), float(key[r, c]), float(share[r, c])) for c in cols]
    return out


def add_pair_calls(
    summary: dict[str, Any],
    arrays: dict[str, Any],
    effects: PairEffectSums,
    null: PairEffectSums,
    tracked: np.ndarray,
    fdr: float,
    min_support: int,
) -> None:
    """The label-free calls over the tracked pairs (`pair_calls`): `summary["calls"]` (the rule and
    how many it calls), `p_value` / `called` on every top pair, `summary["called_pairs"]` (the
    called pairs by reconstruction gain) and `arrays["pair_called"]` (`[m, m]` bool)."""
    iu = np.triu_indices(len(tracked), k=1)
    eligible = effects.count[iu] >= min_support
    null_ok = null.count[iu] >= min_support
    calls = call_pairs(effects.evidence_t()[iu], null.evidence_t()[iu][null_ok], eligible, fdr)
    summary["calls"] = {**calls.summary(), "min_support": min_support}
    lookup = {
        (int(tracked[a]), int(tracked[b])): (float(p), bool(c))
        for a, b, p, c in zip(iu[0], iu[1], calls.pvalue, calls.called, strict=True)
        if c or p < 1.0
    }
    for row in summary.get("top_pairs", []):
        row["p_value"], row["called"] = lookup.get((row["i"], row["j"]), (1.0, False))
    gain = effects.gain_share()[iu]
    order = [o for o in np.argsort(-gain) if calls.called[o]][:TOP_PAIRS]
    summary["called_pairs"] = [
        {
            "i": int(tracked[iu[0][o]]),
            "j": int(tracked[iu[1][o]]),
            "tokens": int(effects.count[iu[0][o], iu[1][o]]),
            "gain_share": float(gain[o]),
            "p_value": float(calls.pvalue[o]),
        }
        for o in order
    ]
    called = np.zeros((len(tracked), len(tracked)), dtype=bool)
    called[iu] = calls.called
    arrays["pair_called"] = called | called.T


def _nanmean(a: np.ndarray) -> float:
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def latent_table(name: str, arrays: dict[str, Any]) -> pd.DataFrame:
    """One row per latent: frequency, mean / max activation and (tracked latents of a CompSAE)
    distinct partners, partner entropy, attention Gini."""
    import pandas as pd

    lat: LatentSums | None = arrays.get("latents")
    if lat is None:
        return pd.DataFrame()
    n = len(lat.fire)
    df = pd.DataFrame(
        {
            "model": name,
            "latent": np.arange(n),
            "fire_count": lat.fire,
            "frequency": lat.frequency,
            "mean_activation": lat.mean_activation,
            "max_activation": np.where(lat.fire > 0, lat.act_max, np.nan),
        }
    )
    ps = arrays.get("partners")
    if ps is not None:
        for col in ("n_partners", "partner_entropy", "attn_gini", "attn_mass"):
            full = np.full(n, np.nan)
            full[arrays["tracked"]] = ps[col]
            df[col] = full
    return df


def flat_rows(metrics: dict[str, Any]) -> pd.DataFrame:
    """Every scalar of `metrics` as one (model, group, metric, value) row (for metrics.parquet)."""
    import pandas as pd

    rows = []
    for model, groups in metrics.get("models", {}).items():
        for group, vals in groups.items():
            if not isinstance(vals, dict):
                continue
            for key, v in vals.items():
                if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                    rows.append({"model": model, "group": group, "metric": key, "value": float(v)})
    return pd.DataFrame(rows, columns=["model", "group", "metric", "value"])
