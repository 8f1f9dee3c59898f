"""Synthetic ground truth: determinism, structure, store round trip, oracle recovery."""

from __future__ import annotations

import numpy as np
import pytest

from compsae.evaluation.ground_truth.config import GroundTruthConfig
from compsae.evaluation.ground_truth.design import (
    generate,
    iter_rows,
    load_ground_truth,
    sample_dictionary,
    write_ground_truth_store,
)
from compsae.evaluation.ground_truth.matching import hungarian_match, mcc, mmcs
from compsae.store import ActivationStore, StoreLayout

SMALL = dict(
    d_model=32, n_features=64, n_rows=5000, n_interactions={2: 8, 3: 4, 4: 2}, noise_std=0.0
)


def test_deterministic_and_chunking_independent():
    cfg = GroundTruthConfig(**SMALL)
    a, b = generate(cfg), generate(cfg)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.C == b.C
    d = sample_dictionary(cfg)
    piece = np.concatenate([x for _, x, _, _ in iter_rows(cfg, d, 4000, 4500)])
    np.testing.assert_array_equal(piece, a.x[4000:4500])
    assert not np.array_equal(generate(cfg.model_copy(update={"seed": 1})).x, a.x)


def test_x_is_the_stated_sum():
    cfg = GroundTruthConfig(**SMALL)
    g = generate(cfg)
    acts = g.acts.toarray()
    active = g.interaction_active
    expected = acts @ g.V + (active * g.dictionary.b) @ g.U
    np.testing.assert_allclose(g.x, expected, atol=1e-5)
    # an interaction is active exactly when all its constituents fire
    for c, members in enumerate(g.C):
        np.testing.assert_array_equal(active[:, c], (acts[:, list(members)] > 0).all(axis=1))
    assert sorted({len(c) for c in g.C}) == [2, 3, 4]
    assert active.sum(axis=0).min() > 20  # group co-firing makes even quadruples common enough


def test_additive_control_has_same_firing_and_no_interactions():
    base = GroundTruthConfig(**SMALL)
    g = generate(base)
    ctrl = generate(base.model_copy(update={"additive_only": True}))
    assert ctrl.C == [] and ctrl.dictionary.groups == g.C
    assert (
        ctrl.acts != g.acts
    ).nnz == 0  # identical firing: the datasets differ only by composition
    np.testing.assert_allclose(ctrl.x, ctrl.acts.toarray() @ ctrl.V, atol=1e-5)


def test_zipf_firing():
    g = generate(GroundTruthConfig(**{**SMALL, "group_prob": 0.0}))
    freq = np.asarray((g.acts > 0).mean(axis=0)).ravel()
    assert freq[:5].mean() > 5 * freq[-20:].mean()


def test_oracle_and_random_dictionaries():
    g = generate(GroundTruthConfig(**SMALL))
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(g.V))
    oracle = -2.0 * g.V[perm]  # sign and scale do not matter
    assert mcc(oracle, g.V) == pytest.approx(1.0)
    assert mmcs(oracle, g.V) == pytest.approx(1.0)
    match = hungarian_match(oracle, g.V)
    assert all(perm[i] == t for i, t in zip(match.learned_idx, match.true_idx, strict=True))
    wide = np.concatenate([rng.standard_normal((64, 32)), g.V])  # extra junk latents are ignored
    assert mcc(wide, g.V) == pytest.approx(1.0)
    random = rng.standard_normal((128, 32))
    assert mcc(random, g.V) < 0.6 and mmcs(random, g.V) < 0.7


def test_store_roundtrip(tmp_path):
    cfg = GroundTruthConfig(**SMALL)
    url = str(tmp_path / "gt")
    layout = StoreLayout(dtype="float32", chunk_rows=512, shard_rows=2048)
    summary = write_ground_truth_store(cfg, url, layout=layout)
    assert summary["n_rows"] == 5000 and summary["n_interactions"] == 14
    st = ActivationStore.open(url)
    assert st.hooks == [cfg.hook] and st.complete and st.verify() == []
    g = generate(cfg)
    np.testing.assert_array_equal(st.read_rows(cfg.hook, 0, 5000), g.x)
    assert st.seq_id[-1] == 4999 // cfg.context and st.pos[cfg.context] == 0
    loaded = load_ground_truth(url)
    np.testing.assert_array_equal(loaded.V, g.V)
    assert loaded.C == g.C and (loaded.acts != g.acts).nnz == 0
    # rerun = resume (nothing to do); another config is refused
    write_ground_truth_store(cfg, url, layout=layout)
    from compsae.errors import UserError

    with pytest.raises(UserError, match="different config"):
        write_ground_truth_store(cfg.model_copy(update={"seed": 5}), url, layout=layout)


def test_config_validation():
    with pytest.raises(ValueError):
        GroundTruthConfig(n_interactions={1: 3})
    with pytest.raises(ValueError):
        GroundTruthConfig(unknown=1)
