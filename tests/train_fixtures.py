"""Small synthetic activation stores for the train-stage tests: sparse sums of known directions."""

from __future__ import annotations

from typing import Any

import numpy as np

from compsae.store import ActivationStore, StoreLayout

HOOK = "blocks.0.hook_resid_post"


def sparse_mixture(
    n: int, d: int = 16, n_dirs: int = 32, active: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`n` rows, each a positive combination of `active` of `n_dirs` unit directions in R^d, plus a
    constant offset; returns (x [n, d] float32, directions [n_dirs, d])."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_dirs, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    idx = np.stack([rng.choice(n_dirs, active, replace=False) for _ in range(n)])
    coef = rng.uniform(0.5, 2.0, size=(n, active))
    x = np.einsum("na,nad->nd", coef, dirs[idx]) + 0.5
    return x.astype(np.float32), dirs


def make_store(
    url: str,
    n: int = 2048,
    d: int = 16,
    seq_len: int = 16,
    chunk_rows: int = 64,
    shard_rows: int = 256,
    dtype: str = "float32",
    seed: int = 0,
) -> tuple[ActivationStore, np.ndarray]:
    """A complete store of `n` synthetic rows (sequences of `seq_len` rows) under `HOOK`."""
    x, _ = sparse_mixture(n, d, seed=seed)
    layout = StoreLayout(chunk_rows=chunk_rows, shard_rows=shard_rows, dtype=dtype)
    st = ActivationStore.create(
        url, {HOOK: d}, n, layout, {"config_hash": f"synthetic-{seed}"}, overwrite=True
    )
    for s in range(st.n_shards):
        lo, hi = st.shard_range(s)
        rows = np.arange(lo, hi)
        st.write_shard(s, {HOOK: x[lo:hi]}, rows % 100, rows // seq_len, rows % seq_len)
    st.finalize()
    return ActivationStore.open(url), x


def model_cfg(kind: str, **fields: Any) -> Any:
    """A model config of `kind` from a settings dict shared by several kinds (each keeps its
    own)."""
    from compsae.train.config import MODEL_CONFIGS, make_model_config

    own = MODEL_CONFIGS[kind].model_fields
    return make_model_config(type=kind, **{k: v for k, v in fields.items() if k in own})
