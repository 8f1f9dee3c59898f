"""Label-free calls of composing pairs: a per-pair test statistic, its null from rows made additive
in the same dictionary, and Benjamini–Hochberg over the candidates.

A user of real activations has no labels to tune a threshold on, so a pair is *called* when the
evidence that its term explains held-out residual is unlikely under "no term". The statistic of a
pair is a one-sided t statistic of `g_t = ⟨r_t + Δ_t, Δ_t / ‖Δ_t‖⟩` over the tokens where both
latents fire (`r = x − x̂`, `Δ` the pair's term): the residual's length along Δ were the term
removed, positive on average when the term explains something. A learned encoder leaves systematic
residual on co-firing rows even of additive data, so the t statistic's null is not Student's t: it
is measured on rows that are additive in the same dictionary (`additive_null_rows`: the linear
reconstruction plus the residuals permuted across tokens, encoded again), and a scaled χ² fitted to
that null turns statistics into p-values. The same rule scores every cell of the composition grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


def additive_null_rows(x_hat_linear: np.ndarray, resid: np.ndarray, seed: int = 0) -> np.ndarray:
    """Rows that are additive in a dictionary by construction: its linear reconstruction plus the
    residuals permuted across tokens (which breaks any tie between a residual and a pair of
    codes)."""
    perm = np.random.default_rng(seed).permutation(len(resid))
    return (x_hat_linear + resid[perm]).astype(np.float32)


def null_pvalues(statistic: np.ndarray, null: np.ndarray) -> np.ndarray:
    """p-values of `statistic` under a scaled χ² fitted to a null sample by its first two moments
    (`c·χ²_ν`, c = var / 2·mean, ν = 2·mean² / var): smooth tails from a few hundred null pairs.
    Statistics at or below 0 get p = 1; fewer than 10 positive null values give p = 1 everywhere
    (no null, no call)."""
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null) & (null > 0)]
    statistic = np.asarray(statistic, dtype=np.float64)
    if len(null) < 10:
        return np.ones_like(statistic)
    mean, var = float(null.mean()), max(float(null.var()), 1e-30)
    c, nu = var / (2 * mean), 2 * mean**2 / var
    return np.where(statistic > 0, stats.chi2.sf(np.maximum(statistic, 0) / c, nu), 1.0)


def benjamini_hochberg(pvalue: np.ndarray, q: float = 0.05) -> np.ndarray:
    """[p] bool: the discoveries of the Benjamini–Hochberg step-up rule at FDR `q`."""
    p = np.asarray(pvalue, dtype=np.float64)
    if p.size == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(p)
    passed = p[order] <= q * np.arange(1, p.size + 1) / p.size
    keep = np.zeros(p.size, dtype=bool)
    if passed.any():
        keep[order[: np.nonzero(passed)[0].max() + 1]] = True
    return keep


def t_statistic(total: np.ndarray, total_sq: np.ndarray, count: np.ndarray) -> np.ndarray:
    """One-sample t of the mean from per-pair sums (`Σg`, `Σg²`, n); 0 where n < 2."""
    n = np.asarray(count, dtype=np.float64)
    mean = total / np.maximum(n, 1)
    var = np.maximum(total_sq / np.maximum(n, 1) - mean**2, 0) * n / np.maximum(n - 1, 1)
    t = mean / np.sqrt(np.maximum(var, 1e-30) / np.maximum(n, 1))
    return np.where(n >= 2, t, 0.0)


@dataclass
class PairCalls:
    """The label-free rule over candidate pairs (one entry per candidate): its statistic, p-value
    and call, plus the rule's settings."""

    statistic: np.ndarray  # [p]
    pvalue: np.ndarray  # [p]
    called: np.ndarray  # [p] bool
    fdr: float
    n_null: int  # null pairs the p-values were fitted on

    def summary(self) -> dict[str, float | int | str]:
        """The rule and its outcome, for metrics.json."""
        n = int(len(self.called))
        return {
            "rule": "t of <r + Δ, Δ/‖Δ‖> vs additive null, Benjamini–Hochberg",
            "fdr": self.fdr,
            "candidates": n,
            "called": int(self.called.sum()),
            "calls_per_1000": 1000.0 * float(self.called.sum()) / max(n, 1),
            "null_pairs": self.n_null,
        }


def call_pairs(
    statistic: np.ndarray, null_statistic: np.ndarray, eligible: np.ndarray, fdr: float
) -> PairCalls:
    """Calls among the candidates: `statistic: [p]` observed, `null_statistic: [p0]` on additive
    rows (pairs with enough support there), `eligible: [p]` candidates with enough support; pairs
    not eligible get p = 1 and are never called but count as candidates."""
    p = np.where(eligible, null_pvalues(statistic, null_statistic), 1.0)
    called = benjamini_hochberg(p, fdr) & eligible
    return PairCalls(statistic, p, called, fdr, int(len(null_statistic)))
