"""Streaming variance, the one implementation train, analysis, evaluation and the store share:
the exact merge of (count, mean, M2) summaries and the fraction of variance unexplained built on it.

``FVU = Σ‖x − x̂‖² / Σ‖x − μ‖²`` over all evaluated tokens and dimensions, μ the mean activation over
those same tokens (not zero: variance about zero inflates explained variance); definitions in
docs/metrics.md.  The denominator is merged per dimension with Chan, Golub & LeVeque's (1979)
parallel formula: no ``Σ‖x‖² − n‖μ‖²`` cancellation, which loses digits on residual streams with a
large mean, and streaming in batches gives the same number as one pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch only where tensors exist: `compsae status` and the store need no torch
    import torch


def merge_moments(
    n_a: int, mean_a: np.ndarray, m2_a: np.ndarray, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Merge two (count, mean [d], M2 [d]) summaries; M2 is Σ (x − mean)² per dimension."""
    if n_a == 0:
        return n_b, mean_b, m2_b
    if n_b == 0:
        return n_a, mean_a, m2_a
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta**2 * (n_a * n_b / n)


def merge_moment_list(
    counts: np.ndarray, means: np.ndarray, m2s: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Merge many summaries in order: `counts [s]`, `means [s, d]`, `m2s [s, d]` -> (count, mean,
    M2)."""
    n_tot, mean_tot, m2_tot = 0, np.zeros(means.shape[1]), np.zeros(means.shape[1])
    for n, mean, m2 in zip(counts, means, m2s, strict=True):
        n_new, mean_tot, m2_tot = merge_moments(n_tot, mean_tot, m2_tot, n, mean, m2)
        n_tot = int(n_new)
    return n_tot, mean_tot, m2_tot


class FVUAccumulator:
    """Accumulate FVU over batches: ``update(x, x_hat)`` then ``fvu``."""

    def __init__(self) -> None:
        self.sq_err = 0.0  # Σ‖x − x̂‖²
        self.count = 0
        self.mean: np.ndarray | None = None  # [d] running mean of x
        self.m2: np.ndarray | None = None  # [d] running Σ (x − mean)²

    def update(self, x: torch.Tensor | np.ndarray, x_hat: torch.Tensor | np.ndarray) -> None:
        """Add one batch: ``x``, ``x_hat``: [batch, d]."""
        x = _np64(x)
        x_hat = _np64(x_hat)
        self.sq_err += float(((x - x_hat) ** 2).sum())
        if x.shape[0] == 0:
            return
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = x.shape[0], mean_b, m2_b
            return
        self.count, self.mean, self.m2 = merge_moments(
            self.count, self.mean, self.m2, x.shape[0], mean_b, m2_b
        )

    @property
    def total_variance(self) -> float:
        """Σ‖x − μ‖² over everything seen."""
        return float(self.m2.sum()) if self.m2 is not None else 0.0

    @property
    def fvu(self) -> float:
        denom = self.total_variance
        return self.sq_err / denom if denom > 0 else float("nan")


def _np64(a: torch.Tensor | np.ndarray) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def fvu(x: torch.Tensor | np.ndarray, x_hat: torch.Tensor | np.ndarray) -> float:
    """FVU of one batch/matrix: ``x``, ``x_hat``: [n, d]."""
    acc = FVUAccumulator()
    acc.update(x, x_hat)
    return acc.fvu
