"""Pair statistics a user can compute on any dictionary, their label-free calls, and the scores.

The post-hoc statistic fits one direction per candidate pair to a dictionary's residual
``r = x − x̂`` jointly, ``r_t ≈ Σ_p z_i z_j [both fire] u_p`` (least squares over all candidates
at once, so a pair is not credited with a neighbour's term it merely co-fires with); the oracle is
the same fit on the residual of the true dictionary with the true codes.  The score is the pair's
in-context effect ``‖u_p‖ · rms(z_i z_j)`` and ``T_p = ‖u_p‖² G_pp / σ²`` (about χ²_d under "no
term") its test statistic.  A learned encoder leaves systematic residual on co-firing rows even of
additive data, so for trained dictionaries the p-values come from a null of the same statistic on
rows made additive in that dictionary (`additive_null_rows`); calls are the pairs
Benjamini–Hochberg keeps at false-discovery rate q (`compsae.analysis.pair_calls`, the rule
`analyze` uses on real activations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import stats
from scipy.sparse.linalg import factorized
from sklearn.metrics import roc_auc_score


@dataclass
class PairTests:
    """Per candidate pair: effect size (score), p-value and co-firing support."""

    score: np.ndarray  # [p] in-context effect norm
    pvalue: np.ndarray  # [p]
    support: np.ndarray  # [p] rows where both fire
    statistic: np.ndarray  # [p] the test statistic the p-value is read from (larger: more evidence)


def pair_design(codes: np.ndarray, pairs: np.ndarray) -> sp.csc_matrix:
    """`[rows, p]` sparse: `z_i z_j` of each candidate pair on each row (0 unless both fire)."""
    cols, rows, vals = [], [], []
    for p, (i, j) in enumerate(pairs):
        zz = codes[:, i] * codes[:, j]
        nz = np.nonzero(zz)[0]
        rows.append(nz)
        cols.append(np.full(len(nz), p))
        vals.append(zz[nz])
    r, c, v = (np.concatenate(a) if a else np.zeros(0) for a in (rows, cols, vals))
    return sp.csc_matrix(
        (v, (r.astype(np.int64), c.astype(np.int64))), shape=(len(codes), len(pairs))
    )


def residual_pair_tests(
    codes: np.ndarray,
    resid: np.ndarray,
    pairs: np.ndarray,
    min_support: int = 5,
    ridge: float = 1e-6,
) -> PairTests:
    """Joint least-squares pair terms of `resid: [rows, d]` on the candidate `pairs: [p, 2]` of the
    columns of `codes: [rows, n]`; χ²_d p-values (the oracle's; see the module docstring)."""
    X = pair_design(codes.astype(np.float64), pairs)  # [rows, p]
    support = np.asarray((X != 0).sum(0)).ravel().astype(np.int64)
    ok = support >= min_support
    G = (X.T @ X).tocsc()  # [p, p], sparse: pairs rarely co-fire
    diag = G.diagonal()
    G = G + sp.identity(len(pairs), format="csc") * (ridge * max(float(diag.mean()), 1e-30) + 1e-30)
    rhs = np.asarray(X.T @ resid.astype(np.float64))  # [p, d]
    solve = factorized(G)
    U = np.stack([solve(rhs[:, c]) for c in range(rhs.shape[1])], axis=1)  # [p, d]
    err = resid - X @ U
    sigma2 = max(float((err**2).sum()) / max(err.size - U.size, 1), 1e-30)
    norm = np.linalg.norm(U, axis=1)
    rms = np.sqrt(diag / np.maximum(support, 1))
    t = norm**2 * diag / sigma2
    return PairTests(
        score=np.where(ok, norm * rms, 0.0),
        pvalue=np.where(ok, stats.chi2.sf(t, resid.shape[1]), 1.0),
        support=support,
        statistic=np.where(ok, t, 0.0),
    )


def auc(score: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of `score` for `labels` (0.5 when one class is missing)."""
    if labels.all() or not labels.any():
        return 0.5
    return float(roc_auc_score(labels, score))


def auc_interval(
    score: np.ndarray, labels: np.ndarray, n_boot: int = 200, seed: int = 0
) -> tuple[float, float]:
    """95 % bootstrap interval of the AUC, resampling pairs."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(score), len(score))
        if labels[idx].all() or not labels[idx].any():
            continue
        vals.append(roc_auc_score(labels[idx], score[idx]))
    if not vals:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def f1(called: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(precision, recall, F1) of `called` against `labels`."""
    tp = float((called & labels).sum())
    prec = tp / max(float(called.sum()), 1.0)
    rec = tp / max(float(labels.sum()), 1.0)
    return prec, rec, (2 * prec * rec / (prec + rec) if prec + rec else 0.0)


def label_tuned_f1(score: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """F1 at the threshold that maximises F1 on a random half of the pairs, scored on the other half
    (an upper reference: a user of real activations has no labels to tune it on)."""
    rng = np.random.default_rng(seed)
    half = rng.random(len(score)) < 0.5
    cands = np.unique(score[half])
    best_t, best = np.inf, -1.0
    for t in cands[:: max(1, len(cands) // 200)]:
        value = f1(score[half] >= t, labels[half])[2]
        if value > best:
            best, best_t = value, t
    return f1(score[~half] >= best_t, labels[~half])[2]


def best_per_latent_auc(
    per_latent: dict[str, np.ndarray], pairs: np.ndarray, labels: np.ndarray
) -> float:
    """The best AUC (either direction) of any symmetric combination (product, sum, min, max) of one
    per-latent statistic of the two members: what a score that never looks at the pair can read."""
    best = 0.5
    for values in per_latent.values():
        a, b = values[pairs[:, 0]], values[pairs[:, 1]]
        for combo in (a * b, a + b, np.minimum(a, b), np.maximum(a, b)):
            value = auc(combo, labels)
            best = max(best, value, 1 - value)
    return best
