"""Merged partials -> the numbers of the report: one metrics dict per model and per-latent tables."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from compsae.analysis.composition import composition_matrix, partner_stats, rank_correlation
from compsae.analysis.cooccurrence import jaccard, npmi, pmi
from compsae.analysis.reconstruction import LatentSums


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


def model_metrics(part: dict[str, Any], dense_thresholds: list[float], partner_threshold: float,
                  tracked: np.ndarray | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, arrays) of one model.  metrics: JSON-able numbers (reconstruction on all / BOS /
    non-BOS tokens, latent health, heads, gate, pair summaries); arrays: what the figures and the
    per-latent table need (composition matrix, partner counts, ...)."""
    both = part["bos"].merge(part["rest"])
    m: dict[str, Any] = {"all": both.summary(), "bos": part["bos"].summary(), "rest": part["rest"].summary()}
    arrays: dict[str, Any] = {}
    lat: LatentSums | None = part.get("latents")
    if lat is not None:
        m["latents"] = lat.summary(dense_thresholds)
        arrays["latents"] = lat
    if part.get("heads") is not None:
        m["heads"] = part["heads"].summary()
    if part.get("gate") is not None:
        m["gate"] = part["gate"].summary()
    pairs = part.get("pairs")
    if pairs is not None and tracked is not None:
        single = np.diag(pairs.co).astype(np.float64)
        comp = composition_matrix(pairs, tracked)
        co = pairs.co.astype(np.float64)
        off = ~np.eye(len(tracked), dtype=bool)
        co_nan = np.where(co > 0, co, np.nan)
        npmi_m = np.where(co > 0, npmi(single, co, pairs.n_tokens), np.nan)
        ps = partner_stats(pairs.attn_to, tracked, partner_threshold)
        m["pairs"] = {
            "n_tracked": len(tracked),
            "n_tokens": pairs.n_tokens,
            "pairs_cooccurring": int((co[off] > 0).sum()),
            "mean_npmi": float(np.nanmean(npmi_m[off])) if np.isfinite(npmi_m[off]).any() else float("nan"),
            "mean_jaccard": float(jaccard(single, co)[off].mean()) if off.any() else float("nan"),
            "spearman_comp_vs_cooccurrence": rank_correlation(comp, co_nan),
            "spearman_comp_vs_npmi": rank_correlation(comp, npmi_m),
            "partners_mean": float(np.mean(ps["n_partners"])),
            "partners_median": float(np.median(ps["n_partners"])),
            "partner_entropy_mean": float(np.nanmean(ps["partner_entropy"])) if np.isfinite(ps["partner_entropy"]).any() else float("nan"),
            "attn_gini_mean": float(np.nanmean(ps["attn_gini"])) if np.isfinite(ps["attn_gini"]).any() else float("nan"),
        }
        arrays.update(comp=comp, cooccurrence=co, npmi=npmi_m, pmi=pmi(single, co, pairs.n_tokens),
                      jaccard=jaccard(single, co), partners=ps, tracked=tracked)
    return m, arrays


def latent_table(name: str, arrays: dict[str, Any]) -> pd.DataFrame:
    """One row per latent: frequency, mean / max activation and (tracked latents of a CompSAE)
    distinct partners, partner entropy, attention Gini."""
    lat: LatentSums | None = arrays.get("latents")
    if lat is None:
        return pd.DataFrame()
    n = len(lat.fire)
    df = pd.DataFrame({
        "model": name, "latent": np.arange(n), "fire_count": lat.fire, "frequency": lat.frequency,
        "mean_activation": lat.mean_activation, "max_activation": np.where(lat.fire > 0, lat.act_max, np.nan),
    })
    ps = arrays.get("partners")
    if ps is not None:
        for col in ("n_partners", "partner_entropy", "attn_gini", "attn_mass"):
            full = np.full(n, np.nan)
            full[arrays["tracked"]] = ps[col]
            df[col] = full
    return df


def flat_rows(metrics: dict[str, Any]) -> pd.DataFrame:
    """Every scalar of `metrics` as one (model, group, metric, value) row (for metrics.parquet)."""
    rows = []
    for model, groups in metrics.get("models", {}).items():
        for group, vals in groups.items():
            if not isinstance(vals, dict):
                continue
            for key, v in vals.items():
                if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                    rows.append({"model": model, "group": group, "metric": key, "value": float(v)})
    return pd.DataFrame(rows, columns=["model", "group", "metric", "value"])
