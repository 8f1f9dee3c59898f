"""Streaming fraction of variance unexplained (docs/science.md definition).

``FVU = Σ‖x − x̂‖² / Σ‖x − μ‖²`` over all evaluated tokens and dimensions, μ the mean activation over
those same tokens (not zero: variance about zero inflates explained variance).  Numerator and
denominator are accumulated separately; the denominator uses per-dimension Chan/Welford merging so
streaming in batches gives the same number as one pass.
"""

from __future__ import annotations

import numpy as np
import torch


class FVUAccumulator:
    """Accumulate FVU over batches: ``update(x, x_hat)`` then ``fvu``."""

    def __init__(self) -> None:
        self.sq_err = 0.0                # Σ‖x − x̂‖²
        self.count = 0
        self.mean: np.ndarray | None = None   # [d] running mean of x
        self.m2: np.ndarray | None = None     # [d] running Σ (x − mean)²

    def update(self, x: torch.Tensor | np.ndarray, x_hat: torch.Tensor | np.ndarray) -> None:
        """Add one batch: ``x``, ``x_hat``: [batch, d]."""
        x = _np64(x)
        x_hat = _np64(x_hat)
        self.sq_err += float(((x - x_hat) ** 2).sum())
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        if self.mean is None:
            self.mean, self.m2, self.count = mean_b, m2_b, n_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n_b / n)
        self.count = n

    @property
    def total_variance(self) -> float:
        """Σ‖x − μ‖² over everything seen."""
        return float(self.m2.sum()) if self.m2 is not None else 0.0

    @property
    def fvu(self) -> float:
        denom = self.total_variance
        return self.sq_err / denom if denom > 0 else float("nan")


def _np64(a: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def fvu(x: torch.Tensor | np.ndarray, x_hat: torch.Tensor | np.ndarray) -> float:
    """FVU of one batch/matrix: ``x``, ``x_hat``: [n, d]."""
    acc = FVUAccumulator()
    acc.update(x, x_hat)
    return acc.fvu
