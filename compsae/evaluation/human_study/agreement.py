"""Krippendorff's alpha for inter-rater agreement (nominal, ordinal, interval).

Implemented from Krippendorff, "Computing Krippendorff's Alpha-Reliability" (2011): build the
coincidence matrix ``o_ck`` (each unit with m ≥ 2 ratings adds 1/(m−1) for every ordered pair of
ratings from different raters), then ``α = 1 − (n−1) Σ o_ck δ²_ck / Σ n_c n_k δ²_ck``.  Missing
ratings are NaN; units with fewer than two ratings are not pairable and drop out.
"""

from __future__ import annotations

import numpy as np

LEVELS = ("nominal", "ordinal", "interval")


def coincidence_matrix(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values, o)``: sorted distinct values [v] and the coincidence matrix [v, v].

    ``data``: [n_raters, n_units] ratings, NaN where a rater did not rate a unit.
    """
    data = np.asarray(data, dtype=np.float64)
    values = np.unique(data[~np.isnan(data)])
    index = {v: i for i, v in enumerate(values)}
    o = np.zeros((len(values), len(values)))
    for unit in data.T:
        r = unit[~np.isnan(unit)]
        m = len(r)
        if m < 2:
            continue
        counts = np.zeros(len(values))
        for v in r:
            counts[index[v]] += 1
        # ordered pairs of ratings from different raters: counts_c * counts_k, minus self-pairs on
        # the diagonal
        o += (np.outer(counts, counts) - np.diag(counts)) / (m - 1)
    return values, o


def _delta2(values: np.ndarray, n_c: np.ndarray, level: str) -> np.ndarray:
    """Squared difference function δ²_ck for the measurement level: [v, v]."""
    v = len(values)
    if level == "nominal":
        return 1.0 - np.eye(v)
    if level == "interval":
        return (values[:, None] - values[None, :]) ** 2
    if level == "ordinal":
        cum = np.concatenate([[0.0], np.cumsum(n_c)])  # cum[g] = Σ_{h<g} n_h
        d = np.zeros((v, v))
        for c in range(v):
            for k in range(v):
                lo, hi = min(c, k), max(c, k)
                d[c, k] = (cum[hi + 1] - cum[lo] - (n_c[c] + n_c[k]) / 2.0) ** 2
        return d
    raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


def krippendorff_alpha(data: np.ndarray, level: str = "nominal") -> float:
    """Krippendorff's alpha of ``data`` [n_raters, n_units] (NaN = missing).

    Returns NaN when there is no pairable data or no variation at all (expected disagreement 0).
    """
    values, o = coincidence_matrix(data)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    if n <= 1 or len(values) < 2:
        return float("nan")
    d2 = _delta2(values, n_c, level)
    observed = (o * d2).sum()
    expected = (np.outer(n_c, n_c) * d2).sum()
    if expected == 0:
        return float("nan")
    return float(1.0 - (n - 1) * observed / expected)
