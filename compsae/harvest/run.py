"""`run_harvest`: run the model over the data once and write every hook's activations to a store.

Flow: load the model while a `TokenFeed` thread tokenizes and packs the data → check hooks and
context, and that the data holds at least one sequence (before touching any store) → open the store
to continue it, or create it for the sequences asked (the data still being tokenized; if it runs out
early the store shrinks to the last whole sequence) → forward passes up to the deepest hook, batch
by batch, rows cast to the storage dtype and gathered into shard buffers on the model's device (on a
GPU the shard's range check and statistics are computed there too, and the device → host copy moves
half the bytes) → a background thread writes each full shard through `ActivationStore.write_shard`
(`compsae.harvest.shards`; bounded queue: the forward pass never waits on disk unless the disk is
slower than the model) → finalize (merged statistics, rounding error, complete=True).

Resuming: a shard is the unit of completion.  A rerun harvests only the missing shards, each run
of consecutive missing shards from the batch holding its first row.  Batches are always the same
sequence ranges, so a resumed run feeds the model exactly the batches an uninterrupted run does
and writes bit-identical values.  The same property lets `compsae.harvest.parallel` hand shard
ranges to Dask workers (`workers` / `scheduler`): each range is `harvest_shards` on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from compsae import __version__, durable
from compsae.errors import UserError
from compsae.files import STORE_DIR
from compsae.harvest.batch_size import MAX_BATCH, PROBE_SEQS, auto_batch_size
from compsae.harvest.config import HarvestConfig
from compsae.harvest.data import describe, packing_rule
from compsae.harvest.records import HarvestOutputs
from compsae.harvest.shards import WriterWaits, harvest_shards, measure_rounding, missing_runs
from compsae.harvest.token_feed import TokenFeed, window_seqs
from compsae.harvest.verdicts import Clock, tokenizer_verdict
from compsae.lm.models import LoadedModel, check_hooks, load_model, stop_layer
from compsae.resources import check_disk, check_memory
from compsae.store import (
    ActivationStore,
    manifest_digest,
    refuse_foreign_files,
    refuse_foreign_folder,
    store_exists,
    writer_lock,
)


def store_url(cfg: HarvestConfig, out_dir: str) -> str:
    """Where the store of this harvest lives: `cfg.store`, else `<out_dir>/store.zarr`."""
    return cfg.store or f"{out_dir.rstrip('/')}/{STORE_DIR}"


def config_hash(cfg: HarvestConfig) -> str:
    """Hash of every config field that can change what the store holds (not its location/device)."""
    from compsae.stages import config_for_hash

    data = config_for_hash(cfg)
    data.pop("store", None)
    return durable.json_digest(data)


def outputs_of(store: ActivationStore) -> dict[str, Any]:
    """What `stage.json` records about a finished harvest (a `HarvestOutputs`)."""
    return HarvestOutputs(
        store=store.url,
        n_rows=store.n_rows,
        hooks=dict(store.manifest["hooks"]),
        dtype=store.layout.dtype,
        digest=manifest_digest(store.manifest),
    ).model_dump(mode="json")


def tokenize_all(cfg: HarvestConfig, tokenizer: Any) -> np.ndarray:
    """The harvest's token sequences `[n_seqs, context]` int32 (fewer if the data runs out), all
    of them before returning."""
    return TokenFeed.start(cfg, tokenizer, progress=True).result(cfg.data.source, cfg.n_tokens)


def load_with_feed(
    cfg: HarvestConfig, window: int, clock: Clock = time.perf_counter
) -> tuple[LoadedModel, TokenFeed]:
    """Load the model, the data being tokenized meanwhile by a `TokenFeed` of `window` sequences
    (the fast tokenizer and safetensors both release the GIL) that goes on beside the forward
    passes; `clock` times the feed's waits."""
    feeds: list[TokenFeed] = []
    try:
        loaded = load_model(
            cfg,
            on_tokenizer=lambda tok: feeds.append(TokenFeed.start(cfg, tok, window, clock=clock)),
        )
    except BaseException:
        for feed in feeds:
            feed.cancel()  # its tokens are not needed
        raise
    return loaded, feeds[0]


def run_harvest(
    cfg: HarvestConfig,
    out_dir: str,
    force: bool = False,
    on_shard_written: Callable[[int], None] | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    processes: bool = True,
    clock: Clock = time.perf_counter,
) -> dict[str, Any]:
    """Harvest `cfg.hooks` of `cfg.model` over `cfg.data` into a store; resume a partial one.

    Returns the stage outputs: `{"store", "n_rows", "hooks", "dtype", "digest"}`.
    `on_shard_written(shard)` is called after each shard is written (tests use it to stop a run);
    in a parallel harvest it runs in this process once the task holding the shard has finished.
    `workers` (a LocalCluster of that many single-threaded workers, `processes=False` for threads)
    or `scheduler` (an existing Dask cluster, tcp://host:port) harvest shard ranges in parallel into
    the same store; the result is byte-identical to the single-process harvest (None / 0: no Dask).
    `clock` times the harvest and its verdicts (`compsae.harvest.verdicts`; a parallel harvest's
    tasks time their own writers with `time.perf_counter`).
    """
    url = store_url(cfg, out_dir)
    refuse_foreign_folder(url)  # before the lock file goes in, and whatever the flags
    if force and store_exists(url):
        refuse_foreign_files(url)  # before the model loads: the store replaced would lose them
    digest = config_hash(cfg)
    existing = None
    if not force and store_exists(url):
        try:
            existing = ActivationStore.open(url)
        except UserError:
            existing = None
        if (
            existing is not None
            and existing.complete
            and existing.manifest.get("config_hash") == digest
        ):
            tqdm.write(f"harvest: {url} is complete for this config; nothing to do")
            return outputs_of(existing)

    # the harvest holds a window of token ids (a parallel one hands each task a copy of its own)
    window = window_seqs(
        cfg, cfg.batch_size if isinstance(cfg.batch_size, int) else MAX_BATCH, cfg.shard_rows
    )
    held = min(window, cfg.n_seqs)
    check_memory(
        held * cfg.context * 4,
        f"tokenizing {held * cfg.context:,} tokens at a time",
        "lower harvest.n_tokens or harvest in several stores",
    )
    loaded, feed = load_with_feed(cfg, window, clock)
    try:
        return _harvest_with_feed(
            cfg,
            url,
            digest,
            existing,
            loaded,
            feed,
            force,
            on_shard_written,
            workers,
            scheduler,
            processes,
            clock,
        )
    finally:
        feed.cancel()  # an error before the last batch: stop tokenizing


def _harvest_with_feed(
    cfg: HarvestConfig,
    url: str,
    digest: str,
    existing: ActivationStore | None,
    loaded: LoadedModel,
    feed: TokenFeed,
    force: bool,
    on_shard_written: Callable[[int], None] | None,
    workers: int | None,
    scheduler: str | None,
    processes: bool,
    clock: Clock = time.perf_counter,
) -> dict[str, Any]:
    """`run_harvest` once the model is loaded and its data is being tokenized into `feed`."""
    widths = check_hooks(loaded, cfg.hooks, cfg.context)
    feed.check_not_empty(cfg.data.source)  # before anything is written
    parallel = bool(workers or scheduler)
    # the sequences asked; fewer when the data runs out, found by the harvest loop (the store
    # shrinks then)
    n_seqs = feed.ready if feed.done else feed.n_seqs
    itemsize = 4 if cfg.dtype == "float32" else 2
    row_bytes = (
        sum(widths.values()) * itemsize + 16
    )  # the activations, tokens (4), seq_id (8), pos (4)
    if force or not store_exists(url):  # a resume has part of it on the disk already
        check_disk(
            url,
            n_seqs * cfg.context * row_bytes,
            f"a store of {n_seqs * cfg.context:,} tokens of {', '.join(widths)}",
            "lower harvest.n_tokens, harvest fewer hooks, or point harvest.store at a larger disk",
        )
    stop = stop_layer(cfg.hooks)
    if cfg.batch_size == "auto":
        # a resumed harvest keeps the batches it started with (same batches, same bytes)
        same = existing is not None and existing.manifest.get("config_hash") == digest
        earlier = (existing.manifest.get("harvest") or {}).get("batch_size") if same else None  # type: ignore[union-attr]
        chosen = earlier or auto_batch_size(
            loaded,
            cfg.hooks,
            feed.seqs(0, feed.wait_for(PROBE_SEQS)),
            stop,
            cfg.shard_rows,
            n_seqs=n_seqs,
        )
        cfg = cfg.model_copy(update={"batch_size": int(chosen)})
        tqdm.write(f"harvest: batch size auto -> {cfg.batch_size} sequences")
    manifest = {
        "model": loaded.info,
        "data": {**describe(cfg.data), "n_seqs": n_seqs},
        "context": cfg.context,
        "prepend_bos": cfg.prepend_bos,
        "bos_rule": packing_rule(
            cfg.context, cfg.prepend_bos, loaded.bos_token_id, loaded.eos_token_id
        ),
        "config_hash": digest,
        "version": __version__,
        "harvest": {
            "stop_at_layer": stop,
            "batch_size": cfg.batch_size,
            "hooks_order": list(cfg.hooks),
        },
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # lock first: --force must not wipe a store another harvest is still writing
    with writer_lock(url, "harvest"), torch.inference_mode():
        store = ActivationStore.create_or_resume(
            url, widths, n_seqs * cfg.context, cfg.layout(), manifest, force=force
        )
        done_before = sum(hi - lo for lo, hi in map(store.shard_range, store.done_shards()))
        t0, waited_before = clock(), feed.waited_s
        if parallel:
            from compsae.harvest.parallel import harvest_parallel

            harvest_parallel(
                store,
                cfg,
                loaded,
                feed,
                widths,
                stop,
                workers=workers or 0,
                scheduler=scheduler,
                processes=processes,
                on_shard_written=on_shard_written,
            )
        else:
            _harvest_into(store, cfg, loaded, feed, widths, stop, on_shard_written, clock)
        seconds = clock() - t0
        todo = (
            store.n_rows - done_before
        )  # rows harvested now (the store shrinks when the data ran out)
    # what start-up costs is the process's time minus this line's (benchmarks/peer_saelens.py reads
    # it)
    tqdm.write(
        f"harvest: {todo:,} tokens in {seconds:.2f} s ({todo / max(seconds, 1e-9):,.0f} tokens/s: "
        "forward "
        "passes, writes, finalize and any wait for tokens; loading not included)"
    )
    verdict = tokenizer_verdict(feed.waited_s - waited_before, seconds)
    if verdict is not None:
        tqdm.write(verdict)
    return outputs_of(store)


def _harvest_into(
    store: ActivationStore,
    cfg: HarvestConfig,
    loaded: LoadedModel,
    feed: TokenFeed | np.ndarray,
    widths: dict[str, int],
    stop: int | None,
    on_shard_written: Callable[[int], None] | None,
    clock: Clock = time.perf_counter,
) -> list[WriterWaits]:
    """Single-process harvest of every missing shard of `store`, then finalize; the tokens may
    still be arriving (`feed`).  Returns each run of shards' waits for the writers (`clock`'s
    seconds)."""
    feed = feed if isinstance(feed, TokenFeed) else TokenFeed.of(feed)
    with record_function("harvest.rounding"):
        rounding, sample = measure_rounding(
            cfg, loaded, feed.seqs(0, feed.wait_for(cfg.batch_size)), widths, stop
        )
    waits: list[WriterWaits] = []
    for shards in missing_runs(sorted(set(range(store.n_shards)) - store.done_shards())):
        if (
            shards.start < store.n_shards
        ):  # past the end when the data ran out (and the store shrank) earlier
            waits.append(
                harvest_shards(
                    store,
                    cfg,
                    loaded,
                    feed,
                    widths,
                    stop,
                    range(shards.start, min(shards.stop, store.n_shards)),
                    on_shard_written=on_shard_written,
                    batch0=sample,
                    clock=clock,
                )
            )
    if feed.ready < feed.n_seqs:
        tqdm.write(
            f"harvest: the data ran out after {store.n_rows} of {cfg.n_tokens} tokens; storing "
            "those"
        )
    with record_function("harvest.finalize"):
        store.finalize(extra={"rounding_error": rounding})
    return waits
