"""Pair terms as probe features: does a k-sparse probe find a variable in a pair of latents that
no single latent holds?

For a pairwise CompSAE the pair (i, j) adds `z_i z_j R_ij` to the reconstruction; its scalar
feature is that term's norm, `f_ij = z_i z_j ‖R_ij‖` (0 unless both fire).  The candidate pairs are
the `n_pairs` with the largest mean `f_ij` over the fit rows (only pairs that co-fire there can
qualify), so the probe chooses among the model's latents and its strongest pair terms at the same
k as every other method.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from compsae.train.trained import TrainedSAE

FeatureFn = Callable[[np.ndarray], np.ndarray]
_ROWS = 1024  # rows per SAE call


def _active(sae: TrainedSAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The active latents of `x: [n, d]` (store units): `idx`, `vals: [n, k]` in model units."""
    idx, vals = [], []
    with torch.no_grad():
        for lo in range(0, len(x), _ROWS):
            xt = torch.as_tensor(np.ascontiguousarray(x[lo : lo + _ROWS], dtype=np.float32))
            _, i, v = sae.model.active(xt.to(sae.device) * sae.scale)
            idx.append(i.cpu().numpy())
            vals.append(v.float().cpu().numpy())
    return np.concatenate(idx), np.concatenate(vals)


def _pair_norms(sae: TrainedSAE, pairs: np.ndarray) -> np.ndarray:
    """`‖R_ij‖` of `pairs: [p, 2]` (model units, unit codes)."""
    with torch.no_grad():
        p = torch.as_tensor(pairs, device=sae.device)
        return sae.model.pair.pair_term(p[:, 0], p[:, 1]).norm(dim=-1).float().cpu().numpy()


def strongest_pairs(sae: TrainedSAE, x_fit: np.ndarray, n_pairs: int) -> np.ndarray:
    """`[≤ n_pairs, 2]` (i < j): the co-firing pairs with the largest mean `z_i z_j ‖R_ij‖` over
    `x_fit: [n, d]`."""
    idx, vals = _active(sae, x_fit)
    k = idx.shape[1]
    a, b = np.triu_indices(k, 1)
    i, j = np.minimum(idx[:, a], idx[:, b]), np.maximum(idx[:, a], idx[:, b])  # [n, P]
    prod = (vals[:, a] * vals[:, b]).ravel()
    keep = prod > 0
    n_lat = int(sae.n_latents)
    key = (i.ravel() * n_lat + j.ravel())[keep]
    uniq, inverse = np.unique(key, return_inverse=True)
    total = np.bincount(inverse, weights=prod[keep])
    pairs = np.stack([uniq // n_lat, uniq % n_lat], 1)
    score = total * _pair_norms(sae, pairs) / max(len(x_fit), 1)
    return pairs[np.argsort(-score, kind="stable")[:n_pairs]]


def pair_feature_map(sae: TrainedSAE, x_fit: np.ndarray, n_pairs: int) -> FeatureFn | None:
    """`x: [n, d]` -> `[n, n_latents + p]`: the codes followed by the strongest pairs' `f_ij`; None
    for a model without a pairwise composer or with no co-firing pair on the fit rows."""
    if getattr(sae.model.cfg, "composer", None) != "pair" or n_pairs <= 0:
        return None
    pairs = strongest_pairs(sae, x_fit, n_pairs)
    if len(pairs) == 0:
        return None
    norms = _pair_norms(sae, pairs)
    n_lat = int(sae.n_latents)
    keys = pairs[:, 0] * n_lat + pairs[:, 1]
    order = np.argsort(keys)
    sorted_keys = keys[order]

    def features(x: np.ndarray) -> np.ndarray:
        idx, vals = _active(sae, x)
        z = np.zeros((len(x), n_lat), dtype=np.float32)
        np.put_along_axis(z, idx, vals, axis=1)
        a, b = np.triu_indices(idx.shape[1], 1)
        key = np.minimum(idx[:, a], idx[:, b]) * n_lat + np.maximum(idx[:, a], idx[:, b])  # [n, P]
        pos = np.clip(np.searchsorted(sorted_keys, key), 0, len(keys) - 1)
        hit = sorted_keys[pos] == key
        col = order[pos]
        rows = np.broadcast_to(np.arange(len(x))[:, None], key.shape)
        f = np.zeros((len(x), len(pairs)), dtype=np.float32)
        prod = vals[:, a] * vals[:, b]
        f[rows[hit], col[hit]] = prod[hit] * norms[col[hit]]
        # store units, as TrainedSAE.encode: codes and pair terms both scale as x
        return np.concatenate([z, f], 1) / sae.scale

    return features
