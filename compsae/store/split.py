"""Train / held-out split by sequence: a hash of the sequence id, so every row of a sequence falls
on the same side and evaluation never sees a token of a training sequence."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from compsae.store.activation_store import ActivationStore

DEFAULT_SPLIT_SEED = 0  # the split's own seed: never the training seed, so every run agrees on it
DEFAULT_HELDOUT_FRACTION = 0.05
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a fixed, platform-independent bit mixer."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def heldout_mask(seq_id: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """`bool[n]`: True for rows whose sequence is held out.  About `fraction` of the sequences are,
    chosen by a hash of (seed, sequence id): stable across runs, machines and store layouts."""
    seq = np.asarray(seq_id).astype(np.int64).view(np.uint64)
    if fraction <= 0:
        return np.zeros(seq.shape, dtype=bool)
    with np.errstate(over="ignore"):
        keyed = _splitmix64(seq ^ _splitmix64(np.full(seq.shape, seed, dtype=np.uint64)))
    # top 53 bits -> uniform in [0, 1)
    u = (keyed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < fraction


def heldout_parts(
    store: ActivationStore, fraction: float, seed: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """`heldout_mask` of a store's sequence ids one shard at a time: (first row, `bool[rows]`).
    The whole column and the hash's temporaries would peak at ~40 bytes a row of the store."""
    for lo, seq_id in store.column_parts("seq_id"):
        yield lo, heldout_mask(seq_id, fraction, seed)


class HeldOutSplit(BaseModel):
    """Which sequences a model never trained on: `fraction` of them, chosen by `seed`.  Training
    records it with the checkpoint; every later stage evaluates on `mask(seq_id)` of that record."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fraction: float = Field(DEFAULT_HELDOUT_FRACTION, ge=0.0, lt=1.0)
    seed: int = DEFAULT_SPLIT_SEED

    def mask(self, seq_id: np.ndarray) -> np.ndarray:
        """`bool[n]`: True for the held-out rows."""
        return heldout_mask(seq_id, self.fraction, self.seed)

    def store_mask(self, store: ActivationStore) -> np.ndarray:
        """`bool[n_rows]`: True for the held-out rows of `store` (`heldout_parts`)."""
        out = np.zeros(store.n_rows, dtype=bool)
        for lo, held in heldout_parts(store, self.fraction, self.seed):
            out[lo : lo + len(held)] = held
        return out


def shared_split(splits: dict[str, HeldOutSplit | None]) -> tuple[HeldOutSplit, list[str]]:
    """The one split several models are evaluated on, and the names of those trained with another
    (evaluated on it, part of their "held-out" rows would be their training rows).  A model
    without a split (trained elsewhere) fits any; with none recorded at all, the default split."""
    recorded = [s for s in splits.values() if s is not None]
    if not recorded:
        return HeldOutSplit(), []
    first = recorded[0]
    return first, [name for name, s in splits.items() if s is not None and s != first]
