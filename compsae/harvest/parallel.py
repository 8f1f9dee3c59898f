"""Parallel harvest on Dask: the missing shards cut into ranges, one task per range, one store.

The client (the `compsae harvest` process) loads the model once to check hooks and measure the
rounding error, creates or resumes the store and holds its writer lock throughout; its token feed
tokenizes beside the workers, and each task goes out, with a copy of its sequences, once the feed
has them (a bounded window of token ids, as in one process).  Each task runs `harvest_shards` for
its range of consecutive shards on a worker, which keeps the model loaded between tasks; workers
write their shards straight into the store (every shard is its own set of files, so independent
writers never touch the same bytes) and never take the lock.
When every task has finished the client calls `finalize`.

Why the store is byte-identical to a single-process harvest: batches are fixed sequence ranges
of the whole harvest, not of a task, and a task computes every batch that holds rows of its
shards, so a batch cut by a range boundary is computed by both tasks with the same values.

With `--scheduler`, every worker must reach the store: use an object store URL (s3://...) or a
file system shared by all machines.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from compsae.dask_cluster import dask_client
from compsae.errors import UserError
from compsae.harvest.config import HarvestConfig
from compsae.harvest.shards import batch_span, harvest_shards, measure_rounding, missing_runs
from compsae.harvest.token_feed import TokenFeed
from compsae.lm.models import LoadedModel, load_model
from compsae.store import ActivationStore, store_exists

TASKS_PER_WORKER = (
    4  # ranges per worker: balances uneven workers, bounds the work lost to one failure
)
IN_FLIGHT_PER_WORKER = 2  # tasks submitted ahead per worker: each holds a copy of its token ids
# Loaded models per (worker, model fields): a worker loads its model once for all its tasks.
_MODELS: dict[tuple[str, str], LoadedModel] = {}
_MODELS_LOCK = threading.Lock()
_MODEL_FIELDS = {"model", "model_seed", "revision", "weight_processing", "device"}


def shard_ranges(missing: list[int], n_ranges: int, max_size: int | None = None) -> list[range]:
    """Cut the missing shards into about `n_ranges` ranges of consecutive shards of similar size,
    at most `max_size` shards each.

    Runs of consecutive missing shards are never merged across a done shard."""
    if not missing:
        return []
    size = max(1, -(-len(missing) // max(1, n_ranges)))
    if max_size is not None:
        size = max(1, min(size, max_size))
    out: list[range] = []
    for run in missing_runs(missing):
        out += [range(lo, min(lo + size, run.stop)) for lo in range(run.start, run.stop, size)]
    return out


@contextlib.contextmanager
def harvest_client(
    workers: int = 0, scheduler: str | None = None, processes: bool = True
) -> Iterator[Any]:
    """A `distributed.Client` for a parallel harvest: to the cluster at `scheduler`, or to a fresh
    `LocalCluster` of `workers` single-threaded workers (one range at a time each; torch's own
    threads do the rest)."""
    if scheduler is None and workers < 1:
        raise UserError(f"--workers must be at least 1 for a parallel harvest (got {workers})")
    with dask_client(workers, scheduler, threads_per_worker=1, processes=processes) as client:
        yield client


def _worker_id() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:  # not inside a Dask worker (a direct call)
        return "local"


def worker_model(cfg: HarvestConfig) -> LoadedModel:
    """The model of `cfg`, loaded once per worker (threads of one process each get their own copy:
    transformer_lens hooks on one model object are not safe to run from two threads).

    The transformer_lens wrapper, when `cfg.hooks` need it, is built here too, under the same lock:
    building it draws from torch's process-wide generator and `from_pretrained` swaps
    `torch.nn.init` process-wide, so neither may overlap another thread worker's model load."""
    key = (_worker_id(), cfg.model_dump_json(include=_MODEL_FIELDS))
    with _MODELS_LOCK:
        if key not in _MODELS:
            loaded = load_model(cfg)
            if not loaded.captures(list(cfg.hooks)):
                _ = loaded.model  # built now, not lazily at the first forward
            _MODELS[key] = loaded
        return _MODELS[key]


def forget_models() -> int:
    """Drop the models this process holds (run on every worker after a harvest); returns how
    many."""
    with _MODELS_LOCK:
        n = len(_MODELS)
        _MODELS.clear()
    return n


def harvest_range(
    cfg: HarvestConfig,
    url: str,
    tokens: np.ndarray,
    first_seq: int,
    widths: dict[str, int],
    stop: int | None,
    shards: range,
) -> int:
    """Dask task: harvest `shards` into the store at `url`; returns the rows written.

    `tokens: [n, context]` are the harvest's sequences `first_seq ..`, covering the range's
    batches."""
    if not store_exists(url):
        raise UserError(
            f"a Dask worker cannot see the store at {url}; with --scheduler use a store every "
            "worker "
            "can reach (s3://... or a shared file system)"
        )
    loaded = worker_model(cfg)
    store = ActivationStore.open(url, mode="r+")
    with torch.inference_mode():
        harvest_shards(
            store, cfg, loaded, tokens, widths, stop, shards, first_seq=first_seq, progress=False
        )
    return store.shard_range(shards.stop - 1)[1] - store.shard_range(shards.start)[0]


def harvest_parallel(
    store: ActivationStore,
    cfg: HarvestConfig,
    loaded: LoadedModel,
    tokens: TokenFeed | np.ndarray,
    widths: dict[str, int],
    stop: int | None,
    workers: int = 0,
    scheduler: str | None = None,
    processes: bool = True,
    on_shard_written: Callable[[int], None] | None = None,
) -> None:
    """Harvest every missing shard of `store` on Dask workers, then finalize it.

    `loaded` is the client's model (rounding error on batch 0); `tokens` the harvest's sequences,
    `[n_seqs, context]` or a `TokenFeed` still filling its window.  Each task is handed a copy of
    the sequences its batches need, and tasks are submitted as the feed fills (at most
    `IN_FLIGHT_PER_WORKER` per worker, none larger than the feed's window holds), so the client
    holds a bounded window of token ids however long the harvest.  When the data runs out the
    store shrinks to its last whole sequence, as in one process.  The caller holds the store's
    writer lock.  On the first failed task the others are cancelled and its error is raised;
    shards already written stay done for a rerun."""
    from distributed import as_completed

    feed = tokens if isinstance(tokens, TokenFeed) else TokenFeed.of(tokens)
    context, bs = cfg.context, cfg.batch_size
    rounding, _ = measure_rounding(
        cfg, loaded, feed.seqs(0, feed.wait_for(bs)), widths, stop
    )  # fails fast
    missing = sorted(set(range(store.n_shards)) - store.done_shards())
    # a range's batches must fit in the window beside one batch on each side that a boundary cuts
    max_shards = max(1, (feed.window - 2 * bs - 2) * context // store.shard_rows)
    with harvest_client(workers, scheduler, processes) as client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        todo = deque(shard_ranges(missing, n_workers * TASKS_PER_WORKER, max_shards))
        run_id = uuid.uuid4().hex[:8]  # task keys unique on a shared cluster
        futures: dict[Any, range] = {}
        done_rows = store.n_rows - sum(hi - lo for lo, hi in map(store.shard_range, missing))
        bar = tqdm(
            total=store.n_rows,
            initial=done_rows,
            desc=f"harvest {loaded.info['name']} ({n_workers} workers)",
            unit="tok",
            unit_scale=True,
            dynamic_ncols=True,
        )

        def submit(shards: range) -> Any:
            """Hand `shards` to a worker with their sequences; None when the data ended before
            them."""
            batches = batch_span(store, shards, context, bs)
            s0 = batches.start * bs
            s1 = min(batches.stop * bs, store.n_rows // context)
            feed.release(s0)  # earlier tasks took copies of theirs
            ready = feed.wait_for(s1)
            if ready < s1:  # the data ran out: the store ends with its last whole sequence
                store.shrink(
                    ready * context, {"data": {**store.manifest.get("data", {}), "n_seqs": ready}}
                )
                bar.total = store.n_rows
                bar.refresh()
                todo.clear()  # later ranges hold no data
                shards = range(shards.start, min(shards.stop, store.n_shards))
                s1 = ready
                if not shards:
                    return None
            seqs = np.array(feed.seqs(s0, s1))  # a copy: the feed's slots are reused once released
            future = client.submit(
                harvest_range,
                cfg,
                store.url,
                seqs,
                s0,
                widths,
                stop,
                shards,
                key=f"compsae-harvest-{run_id}-shards-{shards.start}-{shards.stop}",
                pure=False,
            )
            futures[future] = shards
            return future

        running = as_completed()

        def top_up() -> None:
            while todo and running.count() < IN_FLIGHT_PER_WORKER * n_workers:
                if (future := submit(todo.popleft())) is not None:
                    running.add(future)

        try:
            top_up()
            for future in running:
                bar.update(future.result())  # re-raises the task's error here
                for shard in futures[future]:
                    if on_shard_written is not None:
                        on_shard_written(shard)
                top_up()
        finally:
            bar.close()
            client.cancel(list(futures))
            with contextlib.suppress(Exception):  # a worker that already left holds nothing
                client.run(forget_models)
    if feed.ready < feed.n_seqs:
        tqdm.write(
            f"harvest: the data ran out after {store.n_rows} of {cfg.n_tokens} tokens; storing "
            "those"
        )
    store.finalize(extra={"rounding_error": rounding})
