"""Seed stability: Hungarian matching undoes a relabelling; overlaps are 1 for a relabelled copy
and drop for unrelated effects."""

from __future__ import annotations

import numpy as np

from compsae.analysis.pair_stability import match_latents, pair_stability


def _sym(rng, n):
    m = rng.random((n, n))
    m = np.triu(m, 1)
    return m + m.T


def test_relabelled_copy_is_matched_and_fully_stable():
    rng = np.random.default_rng(0)
    n = 40
    dec = rng.normal(size=(n, 16))
    perm = rng.permutation(n)  # B's latent perm[i] is A's latent i
    dec_b = np.empty_like(dec)
    dec_b[perm] = dec
    got, cos = match_latents(dec, dec_b)
    assert np.array_equal(got, perm) and np.allclose(cos, 1)
    eff, pmi = _sym(rng, n), _sym(rng, n)
    count = np.ones((n, n))

    def to_b(m):
        out = np.empty_like(m)
        out[np.ix_(perm, perm)] = m
        return out

    s = pair_stability(dec, dec_b, eff, to_b(eff), pmi, to_b(pmi), count, count, n=50)
    assert s.effect_overlap == 1.0 and s.pmi_overlap == 1.0
    unrelated = pair_stability(dec, dec_b, eff, _sym(rng, n), pmi, to_b(pmi), count, count, n=50)
    assert unrelated.effect_overlap < 0.3 and unrelated.pmi_overlap == 1.0
    assert abs(s.spearman_effect_pmi) < 0.2  # independent draws
    same = pair_stability(dec, dec_b, eff, to_b(eff), eff, to_b(eff), count, count, n=50)
    assert np.isclose(same.spearman_effect_pmi, 1.0)


def test_seed_stability_over_tracked_subsets_of_a_relabelled_copy():
    from compsae.analysis.pair_stability import SeedPairs, seed_stability

    rng = np.random.default_rng(3)
    n, m = 60, 20
    dec = rng.normal(size=(n, 8))
    perm = rng.permutation(n)
    dec_b = np.empty_like(dec)
    dec_b[perm] = dec
    tracked = rng.choice(n, m, replace=False)
    eff, pmi = _sym(rng, m), _sym(rng, m)
    count = np.ones((m, m))
    a = SeedPairs(dec, tracked, eff, pmi, count)
    # seed B tracks the same latents under its own labels, in another order
    order = rng.permutation(m)
    b = SeedPairs(
        dec_b, perm[tracked][order], eff[np.ix_(order, order)], pmi[np.ix_(order, order)], count
    )
    s = seed_stability({0: a, 1: b}, n=30)
    assert s is not None and s.effect_overlap == 1.0 and s.pmi_overlap == 1.0
    other = SeedPairs(dec_b, perm[tracked][order], _sym(rng, m), pmi[np.ix_(order, order)], count)
    s2 = seed_stability({0: a, 1: other}, n=30)
    assert s2 is not None and s2.effect_overlap < 0.5 and s2.pmi_overlap == 1.0
    assert seed_stability({0: a}) is None
