"""Pair recovery, FVU."""

from __future__ import annotations

import numpy as np
import pytest

from compsae.evaluation.ground_truth.pair_recovery import pair_recovery, select_pairs, true_pairs
from compsae.variance import FVUAccumulator, fvu


def _true_matrix(n: int, C) -> np.ndarray:
    S = np.zeros((n, n))
    for a, b in true_pairs(C):
        S[a, b] = 1.0
    return S


def test_true_pairs_expand_groups():
    assert true_pairs([(3, 1), (0, 2, 4)]) == {(1, 3), (0, 2), (0, 4), (2, 4)}


def test_pair_recovery_true_and_shuffled():
    rng = np.random.default_rng(0)
    n = 100
    C = [tuple(rng.choice(n, r, replace=False).tolist()) for r in (2, 2, 2, 3, 3, 4) * 3]
    S = _true_matrix(n, C)
    identity = {i: i for i in range(n)}
    res = pair_recovery(S, C, identity)
    assert (res.precision, res.recall, res.f1, res.group_recall) == (1.0, 1.0, 1.0, 1.0)
    assert res.average_precision == pytest.approx(1.0)
    # through a permuted matching: latent p[i] stands for feature i
    p = rng.permutation(n)
    S_perm = np.zeros_like(S)
    S_perm[np.ix_(p, p)] = S
    assert pair_recovery(S_perm, C, {int(p[i]): i for i in range(n)}).f1 == 1.0
    # shuffled composition matrix: near zero
    shuffled = S[np.ix_(p, p)]
    assert pair_recovery(shuffled, C, identity).f1 < 0.15
    # unmatched latents cannot score
    assert pair_recovery(S, C, {}).f1 == 0.0


def test_threshold_selection_and_asymmetry():
    S = np.zeros((4, 4))
    S[1, 0] = 0.9  # only one direction set: symmetrised by max(|S|, |S|^T)
    S[2, 3] = -0.5  # sign does not matter
    assert select_pairs(S, threshold=0.4) == [(0, 1), (2, 3)]
    res = pair_recovery(S, [(0, 1)], {i: i for i in range(4)}, selection="threshold", threshold=0.4)
    assert res.precision == 0.5 and res.recall == 1.0 and res.f1 == pytest.approx(2 / 3)
    assert np.isnan(pair_recovery(S, [], {i: i for i in range(4)}).f1)


def test_fvu_streaming_equals_one_pass_and_uses_the_mean():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 8)) + 5.0  # large offset: variance about zero would be wrong
    x_hat = x + 0.1 * rng.standard_normal(x.shape)
    acc = FVUAccumulator()
    for i in range(0, 1000, 137):
        acc.update(x[i : i + 137], x_hat[i : i + 137])
    direct = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert acc.fvu == pytest.approx(direct, rel=1e-10)
    assert fvu(x, x_hat) == pytest.approx(direct, rel=1e-10)
    assert fvu(x, np.broadcast_to(x.mean(0), x.shape)) == pytest.approx(1.0)
