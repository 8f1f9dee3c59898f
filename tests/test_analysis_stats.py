"""Each analysis statistic on tiny hand-made input against a hand value or a plain loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from compsae.analysis.baselines import NMFBaseline, PCABaseline, keep_top_k, sign_split
from compsae.analysis.composition import (
    GateSums,
    HeadSums,
    PairSums,
    active_ids,
    composition_matrix,
    gini,
    partner_stats,
    rank_correlation,
)
from compsae.analysis.cooccurrence import jaccard, npmi, pair_counts, pmi
from compsae.analysis.reconstruction import (
    LatentSums,
    ReconSums,
    TopContexts,
    density_histogram,
    merge_partials,
)


def test_fvu_hand_value_and_not_variance_about_zero():
    x = np.array([[1.0, 2.0], [3.0, 4.0]])  # mean (2, 3); Σ‖x − μ‖² = 1+1+1+1 = 4
    x_hat = np.array([[1.0, 3.0], [3.0, 4.0]])  # Σ‖x − x̂‖² = 1
    s = ReconSums.from_batch(x, x_hat, l0=np.array([2, 3])).summary()
    assert s["fvu"] == pytest.approx(0.25)
    assert s["fve"] == pytest.approx(0.75)
    assert s["l0"] == pytest.approx(2.5)
    # a constant error offset counts (Var(x − x̂) would call this perfect)
    off = ReconSums.from_batch(x, x + 1.0, l0=np.zeros(2)).summary()
    assert off["fvu"] == pytest.approx(4 / 4)


def test_cosine_and_l2_ratio_hand_values():
    x = np.array([[3.0, 4.0], [1.0, 0.0]])
    x_hat = np.array([[3.0, 4.0], [0.0, 2.0]])  # cos 1 and 0; ratios 1 and 2
    s = ReconSums.from_batch(x, x_hat, np.ones(2)).summary()
    assert s["cosine"] == pytest.approx(0.5)
    assert s["l2_ratio"] == pytest.approx(1.5)


def test_streaming_merge_equals_one_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, (300, 7))
    x_hat = x + rng.normal(0, 0.5, x.shape)
    off = x + rng.normal(0, 0.8, x.shape)
    l0 = rng.integers(0, 9, 300)
    whole = ReconSums.from_batch(x, x_hat, l0, off).summary()
    parts = None
    for lo, hi in ((0, 13), (13, 13), (13, 200), (200, 300)):
        parts = merge_partials(
            parts, ReconSums.from_batch(x[lo:hi], x_hat[lo:hi], l0[lo:hi], off[lo:hi])
        )
    got = parts.summary()
    for key in ("fvu", "cosine", "l2_ratio", "l0", "fvu_nocomp", "comp_share"):
        assert got[key] == pytest.approx(whole[key], rel=1e-12)
    # plain loop
    mu = x.mean(0)
    assert whole["fvu"] == pytest.approx(
        ((x - x_hat) ** 2).sum() / ((x - mu) ** 2).sum(), rel=1e-12
    )
    fvu_off = ((x - off) ** 2).sum() / ((x - mu) ** 2).sum()
    assert whole["comp_share"] == pytest.approx((fvu_off - whole["fvu"]) / (1 - whole["fvu"]))


def test_latent_sums_dead_dense_and_histogram():
    z = np.array([[1.0, 0, 0, 2.0], [3.0, 0, 0, 0], [1.0, 0, 5.0, 0], [1.0, 0, 0, 0]])
    lat = LatentSums.from_codes(z[:2]).merge(LatentSums.from_codes(z[2:]))
    assert lat.fire.tolist() == [4, 0, 1, 1]
    assert lat.act_max.tolist()[0] == 3.0 and lat.act_max[2] == 5.0
    assert lat.mean_activation[0] == pytest.approx(1.5)
    s = lat.summary([0.3, 0.9])
    assert s["dead_count"] == 1 and s["dead_fraction"] == 0.25 and s["dead_tokens_evaluated"] == 4
    assert s["dense_fraction_0.3"] == 0.25  # only latent 0 (1.0 > 0.3); latents 2, 3 fire on 0.25
    assert s["dense_fraction_0.9"] == 0.25
    h = density_histogram(lat.fire, 4)
    assert sum(h["counts"]) == 3 and h["dead"] == 1
    # log10(1) = 0 falls in the last bin; log10(0.25) = −0.602 in the bin [−0.75, −0.5)
    assert h["counts"][-1] == 1 and h["counts"][-3] == 2


def test_top_contexts_match_a_sort_and_split_independence():
    rng = np.random.default_rng(1)
    z = np.maximum(rng.normal(size=(50, 6)), 0).astype(np.float32)
    z[:, 5] = 0
    rows = np.arange(100, 150)
    whole = TopContexts.from_codes(z, rows, 3)
    split = TopContexts.from_codes(z[:20], rows[:20], 3).merge(
        TopContexts.from_codes(z[20:], rows[20:], 3)
    )
    for j in range(5):
        order = np.argsort(-z[:, j], kind="stable")[:3]
        assert whole.rows[j].tolist() == (rows[order]).tolist()
        assert np.allclose(whole.values[j], z[order, j])
    assert (whole.rows == split.rows).all()
    assert (whole.rows[5] == -1).all()


def test_cooccurrence_pmi_npmi_jaccard_hand_values():
    # 4 tokens; latent 0 fires on tokens 0,1,2; latent 1 on 0,1; latent 2 on 3
    active = np.array([[0, 1], [1, 0], [0, -1], [2, -1]])
    rows = np.arange(3)
    co = pair_counts(active, rows, 3)
    assert co.tolist() == [[3, 2, 0], [2, 2, 0], [0, 0, 1]]
    single = np.diag(co).astype(float)
    p = pmi(single, co, 4)
    assert p[0, 1] == pytest.approx(math.log((2 / 4) / ((3 / 4) * (2 / 4))))
    assert p[0, 2] == -np.inf
    n = npmi(single, co, 4)
    assert n[0, 1] == pytest.approx(p[0, 1] / -math.log(2 / 4))
    assert n[0, 2] == -1.0
    j = jaccard(single, co)
    assert j[0, 1] == pytest.approx(2 / 3) and j[0, 2] == 0.0 and j[2, 2] == 1.0


def test_pair_sums_and_composition_matrix_against_a_loop():
    rng = np.random.default_rng(2)
    b, h, k, n = 6, 2, 3, 5
    idx = np.stack([rng.permutation(n)[:k] for _ in range(b)])
    z = np.zeros((b, n))
    np.put_along_axis(z, idx, rng.uniform(0.5, 1, (b, k)), 1)
    z[0, idx[0, 2]] = 0.0  # one selected latent that does not fire
    attn = rng.dirichlet(np.ones(k), size=(b, h, k))
    act = active_ids(idx, z)
    tracked = np.array([0, 2, 3])
    rows = np.full(n, -1)
    rows[tracked] = np.arange(3)
    ps = PairSums.from_block(act[:3], attn[:3], rows, 3).merge(
        PairSums.from_block(act[3:], attn[3:], rows, 3)
    )
    want = np.zeros((3, n))
    want_co = np.zeros((3, 3))
    for t in range(b):
        for a in range(k):
            for c in range(k):
                i, j = act[t, a], act[t, c]
                if i < 0 or j < 0:
                    continue
                if rows[i] >= 0 and rows[j] >= 0:
                    want_co[rows[i], rows[j]] += 1
                if a != c and rows[i] >= 0:
                    want[rows[i], j] += attn[t, :, a, c].mean()
    assert np.allclose(ps.attn_to, want)
    assert (ps.co == want_co).all()
    comp = composition_matrix(ps, tracked)
    for r in range(3):
        for c in range(3):
            if r != c and want_co[r, c] > 0:
                assert comp[r, c] == pytest.approx(want[r, tracked[c]] / want_co[r, c])
            else:
                assert np.isnan(comp[r, c])


def test_head_sums_against_a_loop():
    rng = np.random.default_rng(3)
    b, h, k = 4, 3, 4
    attn = rng.dirichlet(np.ones(k), size=(b, h, k))
    act = np.array([[0, 1, 2, 3], [4, -1, 5, 6], [7, 8, -1, -1], [9, 10, 11, 12]])
    s = (
        HeadSums.from_block(act[:2], attn[:2])
        .merge(HeadSums.from_block(act[2:], attn[2:]))
        .summary()
    )
    ent, agree, nq = np.zeros(h), 0.0, 0
    for t in range(b):
        for a in range(k):
            if act[t, a] < 0:
                continue
            nq += 1
            cos = []
            for hh in range(h):
                w = attn[t, hh, a]
                ent[hh] += -(w * np.log(w)).sum()
                for gg in range(h):
                    if gg != hh:
                        u, v = attn[t, hh, a], attn[t, gg, a]
                        cos.append(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
            agree += np.mean(cos)
    assert s["n_queries"] == nq
    assert np.allclose(s["entropy_per_head"], ent / nq)
    assert s["head_agreement"] == pytest.approx(agree / nq)
    uniform = HeadSums.from_block(np.zeros((1, 4), int), np.full((1, 2, 4, 4), 0.25)).summary()
    assert np.allclose(uniform["eff_partners_per_head"], 4.0) and uniform[
        "head_agreement"
    ] == pytest.approx(1.0)


def test_gate_sums_hand_values():
    g = GateSums.from_block(np.array([[0.0, 1.0], [0.5, 0.5]])).summary()
    assert g["gate_mean"] == pytest.approx(0.5)
    assert g["gate_std"] == pytest.approx(math.sqrt(0.125))
    assert sum(g["gate_hist"]["counts"]) == 4


def test_gini_and_partner_stats_hand_values():
    assert gini(np.array([[1.0, 1.0, 1.0, 1.0]]))[0] == pytest.approx(0.0)
    assert gini(np.array([[0.0, 0.0, 0.0, 4.0]]))[0] == pytest.approx(3 / 4)
    # plain-loop Gini: mean absolute difference / (2 mean)
    x = np.array([1.0, 2.0, 7.0, 0.0])
    loop = sum(abs(a - b) for a in x for b in x) / (2 * len(x) ** 2 * x.mean())
    assert gini(x[None])[0] == pytest.approx(loop)
    attn_to = np.array([[0.0, 0.6, 0.3, 0.1], [0.5, 0.0, 0.5, 0.0]])
    ps = partner_stats(attn_to, np.array([0, 1]), threshold=0.2)
    assert ps["n_partners"].tolist() == [2, 2]
    share = np.array([0.6, 0.3, 0.1])
    assert ps["partner_entropy"][0] == pytest.approx(-(share * np.log(share)).sum())
    assert ps["partner_entropy"][1] == pytest.approx(math.log(2))
    assert ps["attn_gini"][1] == pytest.approx(gini(np.array([[0.5, 0.5, 0.0]]))[0])


def test_rank_correlation():
    comp = np.array([[np.nan, 1, 2], [3, np.nan, 4], [5, 6, np.nan]], float)
    assert rank_correlation(comp, comp * 10) == pytest.approx(1.0)
    assert rank_correlation(comp, -comp) == pytest.approx(-1.0)
    assert np.isnan(rank_correlation(comp, np.ones((3, 3))))


def test_pca_baselines_reconstruct_and_sparsify():
    rng = np.random.default_rng(4)
    basis = rng.normal(size=(3, 8))
    x = rng.normal(size=(200, 3)) @ basis + 2.0
    pca = PCABaseline.fit(x, k=3, sparse=False)
    rec = pca(x.astype(np.float32))
    assert np.allclose(rec.x_hat, x, atol=1e-3)
    sparse = PCABaseline.fit(x, k=2, sparse=True)
    out = sparse(x.astype(np.float32))
    assert ((out.z != 0).sum(1) <= 2).all()
    assert ReconSums.from_batch(x, out.x_hat, np.zeros(200)).summary()["fvu"] < 0.5
    assert keep_top_k(np.array([[1.0, -5.0, 2.0]]), 2).tolist() == [[0.0, -5.0, 2.0]]


def test_nmf_baseline_sign_split_and_top_k():
    x = np.array([[1.0, -2.0]])
    assert sign_split(x).tolist() == [[1.0, 0.0, 0.0, 2.0]]
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    nmf = NMFBaseline.fit(x, k=4, n_components=12)
    out = nmf(x)
    assert ((out.z > 0).sum(1) <= 4).all() and (out.z >= 0).all()
    assert ReconSums.from_batch(x, out.x_hat, np.zeros(300)).summary()["fvu"] < 1.0


def test_nmf_baseline_with_more_components_than_the_sign_split_has_dimensions():
    # a small hook: the default 128 atoms exceed 2d = 12; fewer atoms, not a traceback
    x = np.random.default_rng(6).normal(size=(300, 6)).astype(np.float32)
    nmf = NMFBaseline.fit(x, k=4, n_components=128)
    assert nmf.n_latents == 12 and ((nmf(x).z > 0).sum(1) <= 4).all()


def test_top_contexts_ties_go_to_the_lower_row_whatever_the_block_order():
    # every code equal: the k kept must be the k lowest store rows, however the rows are ordered
    rng = np.random.default_rng(2)
    rows = rng.permutation(np.arange(1000, 1064))
    z = np.ones((64, 2), np.float32)
    z[::2, 1] = 0  # latent 1 fires on every other row only
    top = TopContexts.from_codes(z, rows, 5)
    assert top.rows[0].tolist() == sorted(rows)[:5]
    assert top.rows[1].tolist() == sorted(rows[1::2])[:5]
    assert (top.values == 1).all()
