"""What a CompSAE's composition network does: partial sums over blocks and the statistics built on
them.

- `PairSums`: for the tracked (most frequent) latents, co-occurrence counts and the attention mass
  each sends to every other latent (mean over heads, self-attention left out), summed over tokens.
- `HeadSums`: per head, the entropy of each active latent's attention row, its exponential (the
  effective number of partners) and how much heads agree (mean pairwise cosine of their rows).
- `GateSums`: the distribution of gate values.
Only active latents (code > 0) count as queries or partners.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from compsae.analysis.cooccurrence import pair_counts

GATE_BINS = np.linspace(0.0, 1.0, 51)


def active_ids(active_idx: np.ndarray, z: np.ndarray) -> np.ndarray:
    """`active_idx: [b, k]` with −1 where the latent's code is 0 (in the top k but not firing)."""
    vals = np.take_along_axis(z, active_idx, axis=1)
    return np.where(vals > 0, active_idx, -1)


@dataclass
class PairSums:
    """Sums over tokens for the `m` tracked latents (row r = latent `tracked[r]`)."""

    n_tokens: int
    co: np.ndarray  # [m, m] int64 tokens where both fire (diagonal: where each fires)
    attn_to: (
        np.ndarray
    )  # [m, n_latents] Σ head-mean attention from tracked i to j, j ≠ i, both firing

    @classmethod
    def from_block(cls, active: np.ndarray, attn: np.ndarray, rows: np.ndarray, m: int) -> PairSums:
        """`active: [b, k]` firing ids (−1 = not firing), `attn: [b, heads, k, k]`, `rows:
        [n_latents]` latent -> tracked row (−1 = untracked)."""
        n_latents = rows.shape[0]
        w = attn.astype(np.float64).mean(1)  # [b, k, k] query a -> key c
        k = active.shape[1]
        q_row = np.where(active >= 0, rows[np.maximum(active, 0)], -1)  # [b, k]
        qr = np.broadcast_to(q_row[:, :, None], w.shape)
        key = np.broadcast_to(active[:, None, :], w.shape)
        ok = (qr >= 0) & (key >= 0) & ~np.eye(k, dtype=bool)[None]
        flat = qr[ok].astype(np.int64) * n_latents + key[ok]
        attn_to = np.bincount(flat, weights=w[ok], minlength=m * n_latents).reshape(m, n_latents)
        return cls(active.shape[0], pair_counts(active, rows, m), attn_to)

    def merge(self, other: PairSums) -> PairSums:
        return PairSums(
            self.n_tokens + other.n_tokens, self.co + other.co, self.attn_to + other.attn_to
        )


@dataclass
class HeadSums:
    """Per-head sums over active queries of attention entropy (nats) and exp(entropy), and the sum
    over queries of the mean pairwise cosine between heads' attention rows."""

    n_queries: int
    entropy: np.ndarray  # [heads]
    eff_partners: np.ndarray  # [heads]
    agreement: float

    @classmethod
    def from_block(cls, active: np.ndarray, attn: np.ndarray) -> HeadSums:
        """`active: [b, k]` (−1 = not firing), `attn: [b, heads, k, k]`."""
        w = attn.astype(np.float64)
        h = w.shape[1]
        q = active >= 0  # [b, k]
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.where(w > 0, w * np.log(w), 0.0).sum(-1)  # [b, h, k]
        ent_q = ent.transpose(0, 2, 1)[q]  # [queries, h]
        rows = w.transpose(0, 2, 1, 3)[q]  # [queries, h, k]
        unit = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
        gram = unit @ unit.transpose(0, 2, 1)  # [queries, h, h]
        pairs = h * (h - 1)
        agree = (
            float(((gram.sum((1, 2)) - np.trace(gram, axis1=1, axis2=2)) / pairs).sum())
            if pairs
            else 0.0
        )
        return cls(int(q.sum()), ent_q.sum(0), np.exp(ent_q).sum(0), agree)

    def merge(self, other: HeadSums) -> HeadSums:
        return HeadSums(
            self.n_queries + other.n_queries,
            self.entropy + other.entropy,
            self.eff_partners + other.eff_partners,
            self.agreement + other.agreement,
        )

    def summary(self) -> dict[str, Any]:
        n = max(self.n_queries, 1)
        return {
            "n_queries": self.n_queries,
            "entropy_per_head": (self.entropy / n).tolist(),
            "eff_partners_per_head": (self.eff_partners / n).tolist(),
            "head_agreement": self.agreement / n if self.n_queries else float("nan"),
        }


@dataclass
class GateSums:
    """Histogram (`GATE_BINS`), sum and sum of squares of every gate value seen."""

    count: int
    hist: np.ndarray  # [50] int64
    total: float
    total_sq: float

    @classmethod
    def from_block(cls, gate: np.ndarray) -> GateSums:
        g = np.asarray(gate, dtype=np.float64).ravel()
        hist, _ = np.histogram(np.clip(g, 0.0, 1.0), bins=GATE_BINS)
        return cls(g.size, hist.astype(np.int64), float(g.sum()), float((g * g).sum()))

    def merge(self, other: GateSums) -> GateSums:
        return GateSums(
            self.count + other.count,
            self.hist + other.hist,
            self.total + other.total,
            self.total_sq + other.total_sq,
        )

    def summary(self) -> dict[str, Any]:
        n = max(self.count, 1)
        mean = self.total / n
        return {
            "gate_mean": mean,
            "gate_std": float(np.sqrt(max(self.total_sq / n - mean * mean, 0.0))),
            "gate_hist": {"bin_edges": GATE_BINS.tolist(), "counts": self.hist.tolist()},
        }


def gini(x: np.ndarray) -> np.ndarray:
    """Gini coefficient of each row of non-negative `x: [m, n]` (0 = even, → 1 = one entry holds
    all; NaN for an all-zero row): `Σ_i (2i − n − 1) x_(i) / (n Σ x)` over the ascending-sorted
    row."""
    x = np.sort(np.atleast_2d(np.asarray(x, dtype=np.float64)), axis=1)
    n = x.shape[1]
    coef = 2 * np.arange(1, n + 1) - n - 1
    total = x.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (x * coef).sum(1) / (n * total), np.nan)


def partner_stats(
    attn_to: np.ndarray, tracked: np.ndarray, threshold: float
) -> dict[str, np.ndarray]:
    """Per tracked latent, from its attention mass over all other latents `attn_to: [m, n]`:
    distinct partners (share of its mass ≥ `threshold`), partner entropy (nats) and Gini of the mass
    (over the n − 1 other latents)."""
    m, n = attn_to.shape
    total = attn_to.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, attn_to / np.where(total > 0, total, 1.0), 0.0)
        ent = -np.where(share > 0, share * np.log(share), 0.0).sum(1)
    others = np.ones((m, n), dtype=bool)
    others[np.arange(m), tracked] = False
    g = gini(attn_to[others].reshape(m, n - 1)) if n > 1 else np.full(m, np.nan)
    alive = total[:, 0] > 0
    return {
        "n_partners": (share >= threshold).sum(1),
        "partner_entropy": np.where(alive, ent, np.nan),
        "attn_gini": g,
        "attn_mass": total[:, 0],
    }


def composition_matrix(pairs: PairSums, tracked: np.ndarray) -> np.ndarray:
    """`[m, m]` mean attention from tracked i to tracked j over the tokens where both fire (NaN
    where they never do, and on the diagonal)."""
    sums = pairs.attn_to[:, tracked]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(pairs.co > 0, sums / np.maximum(pairs.co, 1), np.nan)
    np.fill_diagonal(out, np.nan)
    return out


def rank_correlation(comp: np.ndarray, other: np.ndarray) -> float:
    """Spearman correlation of the composition matrix with a co-occurrence measure over the
    off-diagonal pairs where both are finite (NaN with fewer than 3 such pairs or no spread)."""
    ok = np.isfinite(comp) & np.isfinite(other) & ~np.eye(comp.shape[0], dtype=bool)
    if ok.sum() < 3 or np.ptp(comp[ok]) == 0 or np.ptp(other[ok]) == 0:
        return float("nan")
    from scipy.stats import (
        spearmanr,
    )  # scipy.stats takes ~1.7 s to import: only when a matrix is compared

    return float(spearmanr(comp[ok], other[ok]).statistic)
