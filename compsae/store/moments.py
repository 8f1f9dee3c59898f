"""Streaming statistics of activations: per-shard moments and their exact merge (float64)."""

from __future__ import annotations

import numpy as np

from compsae.variance import merge_moment_list


def shard_moments(x: np.ndarray, block_rows: int = 1024) -> np.ndarray:
    """[count, mean (d), M2 (d), norm sum] of `x: [rows, d]` (any float dtype), in float64.

    Computed in blocks of `block_rows` (a float64 copy of the whole shard costs more than the rest
    of the write path together), each block's mean and M2 merged with `merge_moment_list`."""
    n, d = x.shape
    counts, means, m2s, norm_sum = [], [], [], 0.0
    for lo in range(0, n, block_rows):
        block = x[lo : lo + block_rows].astype(np.float64)  # [b, d]
        norm_sum += float(np.sqrt(np.einsum("ij,ij->i", block, block)).sum())
        mean = block.mean(axis=0)
        block -= mean
        counts.append(len(block))
        means.append(mean)
        m2s.append(np.einsum("ij,ij->j", block, block))
    if not counts:
        return np.zeros(2 * d + 2)
    count, mean, m2 = merge_moment_list(np.asarray(counts), np.stack(means), np.stack(m2s))
    return np.concatenate([[count], mean, m2, [norm_sum]])


def stats_from_shards(per_shard: np.ndarray, d: int) -> dict[str, object]:
    """A hook's statistics from its per-shard rows `[n_shards, 2d+2]` (count, mean, M2, norm sum):
    count, mean [d], var [d] (population), mean_norm, as plain JSON values."""
    n, mean, m2 = merge_moment_list(
        per_shard[:, 0], per_shard[:, 1 : 1 + d], per_shard[:, 1 + d : 1 + 2 * d]
    )
    norm_sum = float(per_shard[:, 1 + 2 * d].sum())
    return {
        "count": n,
        "mean": mean.tolist(),
        "var": (m2 / max(n, 1)).tolist(),
        "mean_norm": norm_sum / max(n, 1),
    }
