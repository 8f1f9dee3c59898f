"""Sparse probing and the conjunction test on planted features."""

from __future__ import annotations

import numpy as np
import pytest

from compsae.errors import UserError
from compsae.evaluation.probes.sparse import conjunction_test, probe_sweep, split_indices


def _planted(n: int = 2000, m: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, m))
    y = rng.integers(0, 2, n)
    X[:, 17] += 3.0 * y  # the planted feature
    return X, y


def test_planted_feature_is_found():
    X, y = _planted()
    res = probe_sweep(X, y, ks=(1, 2, 5))
    assert res[0].features == [17]
    assert all(r.accuracy > 0.9 and r.f1 > 0.9 for r in res)


def test_shuffled_labels_give_chance():
    X, y = _planted()
    y_shuffled = np.random.default_rng(1).permutation(y)
    for r in probe_sweep(X, y_shuffled, ks=(1, 5)):
        assert 0.4 < r.accuracy < 0.6


def test_group_split_keeps_sequences_together():
    groups = np.repeat(np.arange(100), 10)
    train, test = split_indices(1000, 0.3, seed=0, groups=groups)
    assert not set(groups[train]) & set(groups[test])


def test_non_binary_labels_refused():
    X, _ = _planted(100)
    with pytest.raises(UserError, match="binary"):
        probe_sweep(X, np.arange(100) % 3)


def test_conjunction_test_detects_an_and_feature():
    rng = np.random.default_rng(0)
    n = 4000
    a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
    # latents encode A and B weakly and noisily, so the constituents alone predict A∧B imperfectly
    Z = rng.standard_normal((n, 20))
    Z[:, 3] += 1.0 * a
    Z[:, 8] += 1.0 * b
    comp = rng.standard_normal((n, 16))
    comp[:, 5] += 3.0 * (a & b)  # the composition output carries the conjunction
    control = rng.standard_normal((n, 16))
    res = conjunction_test(Z, comp, control, a, b, k_each=1, k_extra=1)
    assert sorted(res.constituents.features) == [3, 8]
    assert res.with_composition > res.constituents.accuracy + 0.05
    assert res.gain > 0.05
    assert abs(res.with_control - res.constituents.accuracy) < 0.03
