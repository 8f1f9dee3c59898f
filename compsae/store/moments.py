"""Streaming statistics of activations: per-shard moments and their exact merge (float64)."""

from __future__ import annotations

import numpy as np


def merge_moments(counts: np.ndarray, means: np.ndarray, m2s: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Merge per-shard (count, mean [d], M2 [d]) into totals with Chan et al.'s parallel formula."""
    n_tot, mean_tot, m2_tot = 0, np.zeros(means.shape[1]), np.zeros(means.shape[1])
    for n, mean, m2 in zip(counts, means, m2s, strict=True):
        if n == 0:
            continue
        delta = mean - mean_tot
        new_n = n_tot + n
        mean_tot = mean_tot + delta * (n / new_n)
        m2_tot = m2_tot + m2 + delta**2 * (n_tot * n / new_n)
        n_tot = int(new_n)
    return n_tot, mean_tot, m2_tot


def shard_moments(x: np.ndarray, block_rows: int = 1024) -> np.ndarray:
    """[count, mean (d), M2 (d), norm sum] of `x: [rows, d]` (any float dtype), in float64.

    Computed in blocks of `block_rows` (a float64 copy of the whole shard costs more than the rest
    of the write path together), each block's mean and M2 merged with `merge_moments`."""
    n, d = x.shape
    counts, means, m2s, norm_sum = [], [], [], 0.0
    for lo in range(0, n, block_rows):
        block = x[lo:lo + block_rows].astype(np.float64)  # [b, d]
        norm_sum += float(np.sqrt(np.einsum("ij,ij->i", block, block)).sum())
        mean = block.mean(axis=0)
        block -= mean
        counts.append(len(block))
        means.append(mean)
        m2s.append(np.einsum("ij,ij->j", block, block))
    if not counts:
        return np.zeros(2 * d + 2)
    count, mean, m2 = merge_moments(np.asarray(counts), np.stack(means), np.stack(m2s))
    return np.concatenate([[count], mean, m2, [norm_sum]])


def stats_from_shards(per_shard: np.ndarray, d: int) -> dict[str, object]:
    """A hook's statistics from its per-shard rows `[n_shards, 2d+2]` (count, mean, M2, norm sum):
    count, mean [d], var [d] (population), mean_norm, as plain JSON values."""
    n, mean, m2 = merge_moments(per_shard[:, 0], per_shard[:, 1 : 1 + d], per_shard[:, 1 + d : 1 + 2 * d])
    norm_sum = float(per_shard[:, 1 + 2 * d].sum())
    return {"count": n, "mean": mean.tolist(), "var": (m2 / max(n, 1)).tolist(), "mean_norm": norm_sum / max(n, 1)}
