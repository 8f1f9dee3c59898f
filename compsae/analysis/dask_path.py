"""Statistics over a store with Dask: chunk-aligned blocks, one task per block, a fixed merge tree.

The activations are a dask array whose blocks are the store's chunks (read by the store's fast
`read_chunk`, or through Zarr).  Each block becomes one `block_partial` task (the checkpoint applied
to that block only) and the partials are merged by a tree of fixed shape, so memory stays bounded
by a few blocks per worker and the result does not depend on the scheduler: the same floats are
added in the same order whether the threaded scheduler, a LocalCluster or a remote cluster runs it.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed
from dask.diagnostics import ProgressBar
from threadpoolctl import threadpool_limits

from compsae.analysis.block_stats import BlockSpec, block_partial, merge_many
from compsae.analysis.reconstructors import Reconstructor
from compsae.dask_cluster import dask_client  # noqa: F401 - re-exported for callers
from compsae.errors import UserError
from compsae.store import ActivationStore
from compsae.threads import torch_threads

FAN_IN = 8  # partials merged per tree node
_STORES: dict[str, ActivationStore] = {}
_STORES_LOCK = threading.Lock()


def open_store(url: str) -> ActivationStore:
    """The store at `url`, opened once per process (workers reopen it instead of unpickling one)."""
    with _STORES_LOCK:
        if url not in _STORES:
            _STORES[url] = ActivationStore.open(url)
        return _STORES[url]


class ChunkReader:
    """Array-like view of a hook for `dask.array.from_array`: slices aligned to store chunks are
    served by `read_chunk` (memory-mapped, checksum-verified, float32).  Pickles as its URL."""

    def __init__(self, url: str, hook: str, n_rows: int, d: int, chunk_rows: int) -> None:
        self.url, self.hook, self.chunk_rows = url, hook, chunk_rows
        self.shape = (n_rows, d)
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        start, stop, _ = rows.indices(self.shape[0])
        store = open_store(self.url)
        c0, c1 = start // self.chunk_rows, -(-stop // self.chunk_rows)
        parts = [store.read_chunk(self.hook, c) for c in range(c0, c1)]
        block = parts[0] if len(parts) == 1 else np.concatenate(parts)
        off = c0 * self.chunk_rows
        return np.asarray(block[start - off : stop - off, cols], dtype=np.float32)


def acts_array(store: ActivationStore, hook: str, reader: str = "chunk") -> da.Array:
    """`[n_rows, d]` float32 dask array of a hook, one block per store chunk.

    reader "chunk": the store's fast path; "zarr": `dask.array.from_zarr` on the raw Zarr array
    (bfloat16 bits decoded per block)."""
    d, rows = store.d_model(hook), store.chunk_rows
    if reader == "zarr":
        from compsae.store.activation_store import from_storage

        raw = da.from_zarr(store.zarr_array(hook), chunks=(rows, d))
        return raw.map_blocks(from_storage, store.layout.dtype, dtype=np.float32)
    return da.from_array(
        ChunkReader(store.url, hook, store.n_rows, d, rows),
        chunks=(rows, d),
        asarray=True,
        lock=False,
        name=f"compsae-acts-{store.url}-{hook}",
    )


@dataclass
class BlockPlan:
    """Which chunks to evaluate and which of their rows: the held-out rows, the first
    `max_tokens` of them in store order."""

    chunks: list[int]
    keep: np.ndarray  # [n_rows] bool, rows evaluated

    @property
    def n_tokens(self) -> int:
        return int(self.keep.sum())


def plan_blocks(heldout: np.ndarray, chunk_rows: int, max_tokens: int) -> BlockPlan:
    """The evaluated rows: held-out (`heldout: [n_rows]` bool) rows in store order, capped at
    `max_tokens`."""
    keep = np.asarray(heldout, dtype=bool).copy()
    n_chunks = -(-len(keep) // chunk_rows)
    # counted per chunk, then row by row inside the chunk where the cap falls: a running count over
    # every row would cost 8 bytes a row of the store
    whole = len(keep) // chunk_rows  # the summing is buffered: no int copy of the rows is made
    per_chunk = np.zeros(n_chunks, dtype=np.int64)
    per_chunk[:whole] = keep[: whole * chunk_rows].reshape(whole, chunk_rows).sum(axis=1)
    per_chunk[whole:] = keep[whole * chunk_rows :].sum()
    total = np.cumsum(per_chunk)
    if n_chunks and total[-1] > max_tokens:
        c = int(
            np.searchsorted(total, max_tokens, side="right")
        )  # the chunk holding the first row past the cap
        lo = c * chunk_rows
        before = int(total[c - 1]) if c else 0
        keep[lo + np.flatnonzero(keep[lo : lo + chunk_rows])[max_tokens - before :]] = False
        keep[lo + chunk_rows :] = False
        per_chunk[c] = max_tokens - before
        per_chunk[c + 1 :] = 0
    if not keep.any():
        raise UserError(
            "no held-out rows to evaluate: the store's sequences all fall in the training split; "
            "use a larger store or heldout_fraction"
        )
    return BlockPlan([int(c) for c in np.flatnonzero(per_chunk)], keep)


def tree_merge(parts: list[Any], fan_in: int = FAN_IN) -> Any:
    """Merge delayed partials in groups of `fan_in`, level by level (a fixed tree)."""
    if not parts:
        return dask.delayed(merge_many)([])
    while len(parts) > 1:
        parts = [
            dask.delayed(merge_many)(parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)
        ]
    return parts[0] if isinstance(parts[0], Delayed) else dask.delayed(merge_many)(parts)


def build_graph(
    acts: da.Array, pos: np.ndarray, plan: BlockPlan, recons: list[Reconstructor], spec: BlockSpec
) -> Delayed:
    """One `block_partial` task per planned chunk and the merge tree above them."""
    rows = acts.chunks[0][0]
    blocks = acts.to_delayed()[:, 0]
    shared = dask.delayed(
        recons, pure=True, traverse=False
    )  # shipped once per worker, not per task
    shared_spec = dask.delayed(spec, pure=True, traverse=False)
    tasks = []
    for c in plan.chunks:
        lo, hi = c * rows, min((c + 1) * rows, len(plan.keep))
        tasks.append(
            dask.delayed(block_partial, pure=True)(
                blocks[c], plan.keep[lo:hi], pos[lo:hi], lo, shared, shared_spec
            )
        )
    return tree_merge(tasks)


def reference_partials(
    store: ActivationStore,
    hook: str,
    pos: np.ndarray,
    plan: BlockPlan,
    recons: list[Reconstructor],
    spec: BlockSpec,
) -> Any:
    """The same statistics by a plain single-threaded loop over the chunks (the reference)."""
    rows = store.chunk_rows
    total = None
    with torch_threads(1), threadpool_limits(1, user_api="blas"):
        for c in plan.chunks:
            lo, hi = c * rows, min((c + 1) * rows, store.n_rows)
            part = block_partial(
                store.read_chunk(hook, c), plan.keep[lo:hi], pos[lo:hi], lo, recons, spec
            )
            total = merge_many([total, part])
    return total


def compute(root: Delayed, client: Any = None, progress: bool = True) -> Any:
    """Run the graph on `client` (None = threaded scheduler), with a progress bar."""
    if client is None:
        bar = ProgressBar(minimum=1.0) if progress else contextlib.nullcontext()
        # one BLAS thread per task, as torch: the threads are the scheduler's, one per core
        # (numpy's BLAS pool is process-wide, so it is set here, around the whole run)
        with bar, threadpool_limits(1, user_api="blas"):
            return root.compute(scheduler="threads")
    future = client.compute(root)
    if progress:
        from distributed import progress as dist_progress

        dist_progress(future)
    return future.result()
