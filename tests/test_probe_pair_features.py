"""Pair terms as probe features: the codes followed by z_i z_j ‖R_ij‖ of the strongest co-firing
pairs, in store units, checked against a hand computation."""

from __future__ import annotations

import numpy as np
import torch
from pair_fixtures import D, N, composer

from compsae.evaluation.probes.pair_features import pair_feature_map, strongest_pairs
from compsae.train.records import CheckpointMeta, Normalization
from compsae.train.trained import TrainedSAE

SCALE = 2.0


def _sae() -> TrainedSAE:
    model = composer()
    meta = CheckpointMeta(
        type="compsae", model=model.cfg, d_in=D, normalization=Normalization(scale=SCALE)
    )
    return TrainedSAE("comp", "", model, meta)


def _rows(pairs: list[tuple[int, int]], n_each: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros((len(pairs) * n_each, D), dtype=np.float32)
    for r in range(len(x)):
        i, j = pairs[r // n_each]
        x[r, i], x[r, j] = rng.uniform(1, 2, 2) / SCALE  # store units: the model sees x · SCALE
    return x


def test_features_are_the_codes_then_the_strongest_pairs_terms() -> None:
    sae = _sae()
    x_fit = _rows([(1, 2), (3, 4), (5, 6)], 20)
    with torch.no_grad():
        norms = {
            p: float(sae.model.pair.pair_term(torch.tensor([p[0]]), torch.tensor([p[1]])).norm())
            for p in [(1, 2), (3, 4), (5, 6)]
        }
    # the strongest pairs by mean z_i z_j ‖R_ij‖ over the fit rows
    got = [tuple(p) for p in strongest_pairs(sae, x_fit, 2)]
    assert len(got) == 2 and set(got) <= set(norms)
    fmap = pair_feature_map(sae, x_fit, 2)
    assert fmap is not None
    x = _rows([got[0], (7, 8)], 3, seed=1)
    f = fmap(x)
    assert f.shape == (6, N + 2)
    np.testing.assert_allclose(f[:, :N], x[:, :N], rtol=1e-5)  # codes in store units
    a, b = got[0]
    expect = x[:3, a] * x[:3, b] * SCALE * norms[got[0]]  # ‖z_a z_b R_ab‖ / scale, z in model units
    np.testing.assert_allclose(f[:3, N], expect, rtol=1e-4)
    assert (f[:3, N + 1] == 0).all() and (f[3:, N:] == 0).all()  # (7, 8) is not a chosen pair


def test_models_without_a_pairwise_composer_get_no_pair_features() -> None:
    sae = _sae()
    sae.model.cfg = sae.model.cfg.model_copy(update={"composer": "attention"})
    assert pair_feature_map(sae, _rows([(1, 2)], 5), 4) is None
    assert pair_feature_map(_sae(), _rows([(1, 2)], 5), 0) is None
