"""Seed stability of pair effects: match two seeds' latents by decoder cosine (Hungarian), then
compare their top pairs by effect, and the same for the top pairs by PMI as a reference; and the
Spearman correlation of pair effects with PMI."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr


def match_latents(dec_a: np.ndarray, dec_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of the rows of two `[n, d]` decoders by cosine: `(perm, cos)` with
    latent i of A matched to `perm[i]` of B at cosine `cos[i]`."""
    a = dec_a / np.maximum(np.linalg.norm(dec_a, axis=1, keepdims=True), 1e-30)
    b = dec_b / np.maximum(np.linalg.norm(dec_b, axis=1, keepdims=True), 1e-30)
    sim = a @ b.T
    rows, cols = linear_sum_assignment(-sim)
    perm = np.empty(a.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm, sim[rows, cols][np.argsort(rows)]


def top_pair_set(
    score: np.ndarray, n: int, valid: np.ndarray | None = None
) -> set[tuple[int, int]]:
    """The n (i < j) pairs with the largest `score` (optionally only where `valid`)."""
    i, j = np.triu_indices(score.shape[0], 1)
    s = score[i, j].astype(np.float64)
    if valid is not None:
        s = np.where(valid[i, j], s, -np.inf)
    order = np.argsort(-s, kind="stable")[:n]
    return {(int(i[o]), int(j[o])) for o in order if np.isfinite(s[o])}


def overlap(a: set[tuple[int, int]], b_in_a: set[tuple[int, int]]) -> float:
    """|A ∩ B| / |A| (B already relabelled to A's latents); nan for empty A."""
    return len(a & b_in_a) / len(a) if a else float("nan")


def relabel(pairs: set[tuple[int, int]], perm: np.ndarray) -> set[tuple[int, int]]:
    """Pairs in B's labels mapped to A's labels through `perm` (A i ↔ B perm[i])."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return {(min(int(inv[i]), int(inv[j])), max(int(inv[i]), int(inv[j]))) for i, j in pairs}


@dataclass
class PairStability:
    """Top-n overlap of pairs by effect and by PMI across two seeds, the median matched decoder
    cosine, and Spearman ρ of effect vs PMI (seed A, co-firing pairs)."""

    n: int
    effect_overlap: float
    pmi_overlap: float
    median_cos: float
    spearman_effect_pmi: float


def pair_stability(
    dec_a: np.ndarray,
    dec_b: np.ndarray,
    eff_a: np.ndarray,
    eff_b: np.ndarray,
    pmi_a: np.ndarray,
    pmi_b: np.ndarray,
    count_a: np.ndarray,
    count_b: np.ndarray,
    n: int = 100,
) -> PairStability:
    """Compare two seeds' `[n_lat, n_lat]` pair effects and PMI after Hungarian matching."""
    perm, cos = match_latents(dec_a, dec_b)
    va, vb = count_a + count_a.T > 0, count_b + count_b.T > 0
    e = overlap(top_pair_set(eff_a, n, va), relabel(top_pair_set(eff_b, n, vb), perm))
    p = overlap(top_pair_set(pmi_a, n, va), relabel(top_pair_set(pmi_b, n, vb), perm))
    i, j = np.triu_indices(eff_a.shape[0], 1)
    ok = va[i, j] & np.isfinite(pmi_a[i, j])
    rho = (
        float(spearmanr(eff_a[i, j][ok], pmi_a[i, j][ok]).statistic)
        if ok.sum() > 2
        else float("nan")
    )
    return PairStability(n, e, p, float(np.median(cos)), rho)


@dataclass
class SeedPairs:
    """What one trained seed contributes: its decoder `[n_latents, d]`, the tracked latent ids
    `[m]` and, over them, the mean pair effect, PMI and co-firing counts (`[m, m]`)."""

    decoder: np.ndarray
    tracked: np.ndarray
    effect: np.ndarray
    pmi: np.ndarray
    count: np.ndarray


def _full(sub: np.ndarray, tracked: np.ndarray, n: int, fill: float) -> np.ndarray:
    """`[n, n]` with the `[m, m]` matrix `sub` on the tracked rows and columns, `fill` elsewhere."""
    out = np.full((n, n), fill, dtype=np.float64)
    out[np.ix_(tracked, tracked)] = np.nan_to_num(sub, nan=fill)
    return out


def seed_stability(seeds: dict[int, SeedPairs], n: int = 100) -> PairStability | None:
    """Stability of the first two seeds (by seed number) of one variant, or None with fewer than
    two or unequal dictionaries.  Pairs are compared over the full dictionaries (a tracked latent
    of one seed may match an untracked one of the other: that pair then counts as not shared)."""
    if len(seeds) < 2:
        return None
    a, b = (seeds[s] for s in sorted(seeds)[:2])
    if a.decoder.shape != b.decoder.shape:
        return None
    n_lat = a.decoder.shape[0]

    def full(x: SeedPairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = np.triu(np.nan_to_num(x.count), 1)
        return (
            _full(x.effect, x.tracked, n_lat, 0.0),
            _full(x.pmi, x.tracked, n_lat, np.nan),
            _full(count, x.tracked, n_lat, 0.0),
        )

    (ea, pa, ca), (eb, pb, cb) = full(a), full(b)
    return pair_stability(a.decoder, b.decoder, ea, eb, pa, pb, ca, cb, n)
