"""BatchLoader and the sequence split: exactly once per epoch, never a held-out row,
reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from compsae.errors import UserError
from compsae.store import ActivationStore, StoreLayout
from compsae.store.loader import BatchLoader
from compsae.store.split import heldout_mask

HOOK = "h"
N = 3000


@pytest.fixture
def store(tmp_path) -> ActivationStore:
    """Row r holds r in column 0, so served batches say which rows they are; 20 rows per
    sequence."""
    layout = StoreLayout(chunk_rows=64, shard_rows=256, dtype="float32")
    st = ActivationStore.create(
        str(tmp_path / "s.zarr"), {HOOK: 4}, N, layout, {"config_hash": "t"}
    )
    x = np.ones((N, 4), np.float32)
    x[:, 0] = np.arange(N)
    for s in range(st.n_shards):
        lo, hi = st.shard_range(s)
        rows = np.arange(lo, hi)
        st.write_shard(s, {HOOK: x[lo:hi]}, rows % 7, rows // 20, rows % 20)
    st.finalize()
    return ActivationStore.open(st.url)


def _rows(loader: BatchLoader) -> list[np.ndarray]:
    return [b[:, 0].numpy().astype(np.int64) for b in loader]


def test_every_training_row_exactly_once_per_epoch_and_never_heldout(store):
    loader = BatchLoader(
        store, HOOK, batch_size=100, heldout_fraction=0.2, seed=1, epochs=2, mix_chunks=5
    )
    batches = _rows(loader)
    held = heldout_mask(store.seq_id, 0.2)
    train_rows = np.flatnonzero(~held)
    assert 0 < held.sum() < N and len(batches) == 2 * len(loader)
    for epoch in (batches[: len(loader)], batches[len(loader) :]):
        served = np.concatenate(epoch)
        np.testing.assert_array_equal(np.sort(served), train_rows)
        assert all(len(b) == 100 for b in epoch[:-1])
    first = np.concatenate(batches[: len(loader)])
    assert not np.array_equal(first, np.concatenate(batches[len(loader) :]))  # reshuffled per epoch
    assert len(np.unique(first[:100] // 64)) > 3  # a batch mixes several chunks


def test_heldout_split_is_by_sequence_and_disjoint(store):
    held = heldout_mask(store.seq_id, 0.3, seed=0)
    for s in np.unique(store.seq_id):
        assert len(set(held[store.seq_id == s])) == 1
    loader = BatchLoader(
        store, HOOK, batch_size=50, split="heldout", heldout_fraction=0.3, epochs=1, shuffle=False
    )
    np.testing.assert_array_equal(np.concatenate(_rows(loader)), np.flatnonzero(held))


def test_same_seed_same_order_other_seed_other_order(store):
    kw = {"batch_size": 128, "heldout_fraction": 0.1, "epochs": 1}
    a = np.concatenate(_rows(BatchLoader(store, HOOK, seed=7, num_threads=1, **kw)))
    b = np.concatenate(_rows(BatchLoader(store, HOOK, seed=7, num_threads=3, prefetch=1, **kw)))
    c = np.concatenate(_rows(BatchLoader(store, HOOK, seed=8, **kw)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("stop_after", [1, 7, 11, 30])
def test_resume_from_state_continues_the_same_stream(store, stop_after):
    kw = {"batch_size": 100, "heldout_fraction": 0.1, "seed": 3, "epochs": 2, "mix_chunks": 4}
    whole = _rows(BatchLoader(store, HOOK, **kw))
    first = BatchLoader(store, HOOK, **kw)
    it = iter(first)
    head = [next(it)[:, 0].numpy().astype(np.int64) for _ in range(stop_after)]
    state = first.state_dict()
    it.close()
    second = BatchLoader(store, HOOK, **kw)
    second.load_state_dict(state)
    got = np.concatenate(head + _rows(second))
    np.testing.assert_array_equal(got, np.concatenate(whole))
    other = BatchLoader(store, HOOK, **{**kw, "seed": 4})
    with pytest.raises(UserError, match="seed"):
        other.load_state_dict(state)


def test_normalisation_reaches_sqrt_d_mean_norm(store):
    loader = BatchLoader(
        store, HOOK, batch_size=N // 2, heldout_fraction=0.0, normalize=True, epochs=1
    )
    x = np.concatenate([b.numpy() for b in loader])
    assert np.linalg.norm(x, axis=1).mean() == pytest.approx(2.0, rel=1e-5)  # sqrt(d=4)
    assert loader.scale == pytest.approx(2.0 / store.stats(HOOK)["mean_norm"])


def test_bad_loader_input(store):
    with pytest.raises(UserError, match="no hook 'other'"):
        BatchLoader(store, "other")
    with pytest.raises(UserError, match="batch_size 5000 is larger"):
        BatchLoader(store, HOOK, batch_size=5000)


def test_corrupt_chunk_is_reported_by_the_iterator(store):
    path = f"{store.path}/acts/{HOOK}/c/1/0"
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe\xfd")
    fresh = ActivationStore.open(store.url)
    with pytest.raises(UserError, match="shard 1"):
        _rows(BatchLoader(fresh, HOOK, batch_size=100, epochs=1))


@pytest.mark.parametrize("world", [2, 3])
def test_parts_read_their_share_of_the_same_batches(tmp_path, world: int) -> None:
    """A data-parallel rank's loader yields its contiguous share of each global batch, also for the
    epoch's shorter last batch and after a resume in the middle of an epoch."""
    n, d = 1000, 6
    st = ActivationStore.create(
        str(tmp_path / "s.zarr"),
        {"h": d},
        n,
        StoreLayout(chunk_rows=64, shard_rows=256),
        {"config_hash": "t"},
    )
    x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    for s in range(st.n_shards):
        lo, hi = st.shard_range(s)
        rows = np.arange(lo, hi)
        st.write_shard(s, {"h": x[lo:hi]}, rows % 7, rows // 50, rows % 50)
    st.finalize()
    kw = dict(batch_size=49, heldout_fraction=0.1, seed=3, mix_chunks=3, epochs=2, num_threads=1)
    whole = [b.numpy() for b in BatchLoader(st.url, "h", **kw)]
    parts = [
        [b.numpy() for b in BatchLoader(st.url, "h", part=(r, world), **kw)] for r in range(world)
    ]
    assert all(len(p) == len(whole) for p in parts)
    for i, batch in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([p[i] for p in parts]), batch)
        assert max(len(p[i]) for p in parts) - min(len(p[i]) for p in parts) <= 1
    resumed = BatchLoader(st.url, "h", part=(1, world), **kw)
    resumed.load_state_dict({**resumed.state_dict(), "batch": 7})
    np.testing.assert_array_equal(next(iter(resumed)).numpy(), parts[1][7])


@pytest.mark.parametrize(
    ("chunk_rows", "shard_rows", "n"), [(3, 9, 100), (5, 5, 37), (64, 256, 3000)]
)
@pytest.mark.parametrize("split", ["train", "heldout", "all"])
def test_split_read_shard_by_shard_serves_the_rows_of_the_whole_column(
    tmp_path, chunk_rows, shard_rows, n, split
):
    """The loader keeps one bit per row, read shard by shard: with shards and chunks not a whole
    number of bytes of bits and a partial last chunk, it serves exactly the rows the mask over
    the whole column selects, in store order when not shuffled."""
    layout = StoreLayout(chunk_rows=chunk_rows, shard_rows=shard_rows, dtype="float32")
    st = ActivationStore.create(
        str(tmp_path / "s.zarr"), {HOOK: 2}, n, layout, {"config_hash": "t"}
    )
    x = np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.float32)
    for s in range(st.n_shards):
        lo, hi = st.shard_range(s)
        rows = np.arange(lo, hi)
        st.write_shard(s, {HOOK: x[lo:hi]}, rows % 7, rows // 4, rows % 4)
    st.finalize()
    st = ActivationStore.open(st.url)
    held = heldout_mask(st.seq_id, 0.4, seed=2)
    expect = {"train": np.flatnonzero(~held), "heldout": np.flatnonzero(held), "all": np.arange(n)}[
        split
    ]
    assert 0 < held.sum() < n
    loader = BatchLoader(
        st,
        HOOK,
        batch_size=4,
        split=split,
        heldout_fraction=0.4,
        split_seed=2,
        epochs=1,
        shuffle=False,
        mix_chunks=3,
    )
    assert loader.n_rows == len(expect)
    np.testing.assert_array_equal(np.concatenate(_rows(loader)), expect)


def test_store_mask_read_shard_by_shard_equals_the_mask_of_the_whole_column(store):
    from compsae.store.split import HeldOutSplit

    split = HeldOutSplit(fraction=0.3, seed=5)
    fresh = ActivationStore.open(store.url)  # no column cached: read part by part
    got = split.store_mask(fresh)
    np.testing.assert_array_equal(got, split.mask(store.seq_id))
    assert 0 < got.sum() < N and store.n_shards > 1
