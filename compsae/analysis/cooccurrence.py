"""Pair statistics of latents from co-occurrence counts: PMI, normalised PMI, Jaccard.

Inputs are counts over the same `n_tokens` tokens: `single: [m]` tokens where each latent fires and
`pair: [m, m]` tokens where both fire (its diagonal equals `single`).  Definitions
(docs/metrics.md): `PMI = log P(i,j) / (P(i) P(j))`, normalised PMI = PMI / (−log P(i,j)), Jaccard =
|A_i ∩ A_j| / |A_i ∪ A_j|. Pairs never seen together get PMI −inf, NPMI −1 and Jaccard 0.
"""

from __future__ import annotations

import numpy as np


def pair_counts(active: np.ndarray, rows: np.ndarray, m: int) -> np.ndarray:
    """Co-occurrence counts `[m, m]` of one block: `active: [b, k]` latent ids (−1 = none) mapped by
    `rows: [n_latents]` to 0..m−1 (−1 = not tracked); each token counts a pair once."""
    r = np.where(active >= 0, rows[np.maximum(active, 0)], -1)  # [b, k]
    ri, rj = r[:, :, None], r[:, None, :]
    ok = (ri >= 0) & (rj >= 0)
    flat = (np.broadcast_to(ri, ok.shape)[ok] * m + np.broadcast_to(rj, ok.shape)[ok]).astype(
        np.int64
    )
    return np.bincount(flat, minlength=m * m).reshape(m, m)


def pmi(single: np.ndarray, pair: np.ndarray, n_tokens: int) -> np.ndarray:
    """`[m, m]` pointwise mutual information in nats."""
    p_i = single / n_tokens
    p_ij = pair / n_tokens
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(p_ij) - np.log(p_i)[:, None] - np.log(p_i)[None, :]
    return np.where(pair > 0, out, -np.inf)


def npmi(single: np.ndarray, pair: np.ndarray, n_tokens: int) -> np.ndarray:
    """`[m, m]` normalised PMI in [−1, 1]; 1 where two latents always fire together."""
    p_ij = pair / n_tokens
    with np.errstate(divide="ignore", invalid="ignore"):
        out = pmi(single, pair, n_tokens) / -np.log(p_ij)
    # P(i,j) = 1 gives 0/0: two latents firing on every token are perfectly associated
    out = np.where(p_ij >= 1.0, 1.0, out)
    return np.where(pair > 0, out, -1.0)


def jaccard(single: np.ndarray, pair: np.ndarray) -> np.ndarray:
    """`[m, m]` |A_i ∩ A_j| / |A_i ∪ A_j| (0 where neither fires)."""
    union = single[:, None] + single[None, :] - pair
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, pair / np.maximum(union, 1), 0.0)
