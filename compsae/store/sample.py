"""Samples of store rows for fitting (baselines, PCA / NMF): read whole chunks spread evenly over
the store, so a sample of a sorted or clustered store still covers all of it."""

from __future__ import annotations

import numpy as np

from compsae.store.activation_store import ActivationStore


def spread_rows(store: ActivationStore, hook: str, keep: np.ndarray, n: int) -> np.ndarray:
    """Up to `n` rows `[m, d]` float32 of `hook` among those where `keep: bool[n_rows]`, from chunks
    spread evenly over the store (empty `[0, d]` when `keep` selects nothing)."""
    order = np.unique(np.linspace(0, store.n_chunks - 1, store.n_chunks).astype(int))
    stride = max(1, store.n_chunks // max(1, -(-n // store.chunk_rows)))
    order = np.concatenate([order[::stride], np.setdiff1d(order, order[::stride])])
    got, total = [], 0
    for c in order:
        lo = c * store.chunk_rows
        x = store.read_chunk(hook, int(c))
        x = x[keep[lo : lo + len(x)]]
        got.append(x)
        total += len(x)
        if total >= n:
            break
    if not got:
        return np.zeros((0, store.d_model(hook)), dtype=np.float32)
    return np.concatenate(got)[:n].astype(np.float32)
