"""Matching learned decoder directions to true feature directions: MCC and MMCS.

Definitions (docs/metrics.md): MCC is the mean |cos| over a one-to-one (Hungarian) matching of
learned directions to true directions; MMCS is the mean over true directions of the best |cos| to
any learned direction.  Both are sign-invariant because a latent may learn ``-v`` with a negative
encoder and still be the same feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass
class Matching:
    """A one-to-one assignment of learned latents to true features."""

    learned_idx: np.ndarray  # [n_matched] latent index
    true_idx: np.ndarray  # [n_matched] true feature index (learned_idx[i] <-> true_idx[i])
    abs_cos: np.ndarray  # [n_matched] |cos| of each matched pair

    @property
    def mcc(self) -> float:
        """Mean |cos| over matched pairs."""
        return float(self.abs_cos.mean()) if len(self.abs_cos) else 0.0

    def latent_to_true(self, min_cos: float = 0.0) -> dict[int, int]:
        """``{latent: true feature}`` for matched pairs with |cos| >= ``min_cos``."""
        keep = self.abs_cos >= min_cos
        return {
            int(l_): int(t)
            for l_, t in zip(self.learned_idx[keep], self.true_idx[keep], strict=True)
        }


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norm, 1e-12)


def abs_cosine(learned: np.ndarray, true: np.ndarray) -> np.ndarray:
    """|cos| between every learned and every true direction: [n_learned, n_true].

    ``learned``: [n_learned, d] decoder rows; ``true``: [n_true, d].  Zero rows get cos 0.
    """
    if learned.shape[1] != true.shape[1]:
        raise ValueError(
            f"dimension mismatch: learned d={learned.shape[1]}, true d={true.shape[1]}"
        )
    return np.abs(_unit(learned) @ _unit(true).T)


def hungarian_match(learned: np.ndarray, true: np.ndarray) -> Matching:
    """Maximum-|cos| one-to-one matching; matches ``min(n_learned, n_true)`` pairs."""
    cos = abs_cosine(learned, true)
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return Matching(learned_idx=rows, true_idx=cols, abs_cos=cos[rows, cols])


def mcc(learned: np.ndarray, true: np.ndarray) -> float:
    """Mean |cos| of the Hungarian matching, averaged over the ``min(n_learned, n_true)`` matched
    pairs.

        With a wider dictionary than the truth (the usual case) this is the mean over true features.
    """
    return hungarian_match(learned, true).mcc


def mmcs(learned: np.ndarray, true: np.ndarray) -> float:
    """Mean over true directions of the best |cos| to any learned direction (not one-to-one)."""
    return float(abs_cosine(learned, true).max(axis=0).mean())
