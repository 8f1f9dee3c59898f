"""`run_harvest`: run the model over the data once and write every hook's activations to a store.

Flow: check model, hooks and context (before touching any store) → tokenize and pack the data up
front (so an empty data set is refused before anything is written, and the row count is exact)
→ open the store to continue it, or create it → forward passes up to the deepest hook, batch by
batch, rows cast to the storage dtype and gathered into shard buffers on the model's device (on a
GPU the shard's range check and statistics are computed there too, and the device → host copy
moves half the bytes) → a background thread writes each full shard through
`ActivationStore.write_shard` (`compsae.harvest.shards`; bounded queue: the forward pass never waits on disk unless the disk
is slower than the model) → finalize (merged statistics, rounding error, complete=True).

Resuming: a shard is the unit of completion.  A rerun harvests only the missing shards, each run
of consecutive missing shards from the batch holding its first row.  Batches are always the same
sequence ranges, so a resumed run feeds the model exactly the batches an uninterrupted run does
and writes bit-identical values.  The same property lets `compsae.harvest.parallel` hand shard
ranges to Dask workers (`workers` / `scheduler`): each range is `harvest_shards` on its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from compsae import __version__, durable
from compsae.errors import UserError
from compsae.files import STORE_DIR
from compsae.harvest.batch_size import auto_batch_size
from compsae.harvest.config import HarvestConfig
from compsae.harvest.data import describe, packing_rule, token_sequences
from compsae.harvest.models import LoadedModel, check_hooks, load_model, special_ids, stop_layer
from compsae.harvest.records import HarvestOutputs
from compsae.harvest.shards import WriterWaits, harvest_shards, measure_rounding, missing_runs
from compsae.resources import check_disk, check_memory
from compsae.store import ActivationStore, manifest_digest, refuse_foreign_folder, store_exists, writer_lock


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
    return HarvestOutputs(store=store.url, n_rows=store.n_rows, hooks=dict(store.manifest["hooks"]),
                          dtype=store.layout.dtype, digest=manifest_digest(store.manifest)).model_dump(mode="json")


def tokenize_all(cfg: HarvestConfig, tokenizer: Any,
                 cancel: threading.Event | None = None) -> np.ndarray:
    """The harvest's token sequences `[n_seqs, context]` int32 (fewer if the data runs out).
    Setting `cancel` stops it early (the model failed to load: its tokens are not needed)."""
    bos, eos = special_ids(tokenizer, cfg.model)
    stream = token_sequences(cfg.data, tokenizer, cfg.context, cfg.prepend_bos, bos, eos)
    out = np.empty((cfg.n_seqs, cfg.context), dtype=np.int32)
    n = 0
    with tqdm(total=cfg.n_seqs, desc="tokenize", unit="seq", leave=False) as bar:
        for seq in stream:
            out[n] = seq
            n += 1
            bar.update(1)
            if n == cfg.n_seqs or (cancel is not None and cancel.is_set()):
                break
    if n == 0:
        raise UserError(f"data set {cfg.data.source!r} is empty or shorter than one sequence of {cfg.context} "
                        "tokens; check data.source / data.text_field or lower harvest.context")
    if n < cfg.n_seqs:
        tqdm.write(f"harvest: the data ran out after {n * cfg.context} of {cfg.n_tokens} tokens; storing those")
    return out[:n]


def load_and_tokenize(cfg: HarvestConfig) -> tuple[LoadedModel, np.ndarray]:
    """Load the model and tokenize the data (`[n_seqs, context]` int32); the text is tokenized in a
    thread while the weights load (the fast tokenizer and safetensors both release the GIL)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="compsae-tokenize")
    cancel = threading.Event()
    pending: list[Future[np.ndarray]] = []
    try:
        loaded = load_model(cfg, on_tokenizer=lambda tok: pending.append(pool.submit(tokenize_all, cfg, tok, cancel)))
        return loaded, pending[0].result()
    finally:
        cancel.set()  # only matters when loading failed: the result was taken otherwise
        pool.shutdown(wait=True)


def run_harvest(cfg: HarvestConfig, out_dir: str, force: bool = False,
                on_shard_written: Callable[[int], None] | None = None, workers: int | None = None,
                scheduler: str | None = None, processes: bool = True) -> dict[str, Any]:
    """Harvest `cfg.hooks` of `cfg.model` over `cfg.data` into a store; resume a partial one.

    Returns the stage outputs: `{"store", "n_rows", "hooks", "dtype", "digest"}`.
    `on_shard_written(shard)` is called after each shard is written (tests use it to stop a run);
    in a parallel harvest it runs in this process once the task holding the shard has finished.
    `workers` (a LocalCluster of that many single-threaded workers, `processes=False` for threads)
    or `scheduler` (an existing Dask cluster, tcp://host:port) harvest shard ranges in parallel into
    the same store; the result is byte-identical to the single-process harvest (None / 0: no Dask).
    """
    url = store_url(cfg, out_dir)
    refuse_foreign_folder(url)  # before the lock file goes in, and whatever the flags
    digest = config_hash(cfg)
    existing = None
    if not force and store_exists(url):
        try:
            existing = ActivationStore.open(url)
        except UserError:
            existing = None
        if existing is not None and existing.complete and existing.manifest.get("config_hash") == digest:
            tqdm.write(f"harvest: {url} is complete for this config; nothing to do")
            return outputs_of(existing)

    check_memory(cfg.n_seqs * cfg.context * 4, f"tokenizing {cfg.n_tokens:,} tokens",
                 "lower harvest.n_tokens or harvest in several stores")
    loaded, tokens = load_and_tokenize(cfg)  # tokens: [n_seqs, context]
    widths = check_hooks(loaded, cfg.hooks, cfg.context)
    itemsize = 4 if cfg.dtype == "float32" else 2
    row_bytes = sum(widths.values()) * itemsize + 16  # the activations, tokens (4), seq_id (8), pos (4)
    if force or not store_exists(url):  # a resume has part of it on the disk already
        check_disk(url, tokens.size * row_bytes, f"a store of {tokens.size:,} tokens of {', '.join(widths)}",
                   "lower harvest.n_tokens, harvest fewer hooks, or point harvest.store at a larger disk")
    stop = stop_layer(cfg.hooks)
    if cfg.batch_size == "auto":
        # a resumed harvest keeps the batches it started with (same batches, same bytes)
        same = existing is not None and existing.manifest.get("config_hash") == digest
        earlier = (existing.manifest.get("harvest") or {}).get("batch_size") if same else None  # type: ignore[union-attr]
        chosen = earlier or auto_batch_size(loaded, cfg.hooks, tokens, stop, cfg.shard_rows)
        cfg = cfg.model_copy(update={"batch_size": int(chosen)})
        tqdm.write(f"harvest: batch size auto -> {cfg.batch_size} sequences")
    n_seqs = tokens.shape[0]
    n_rows = n_seqs * cfg.context
    manifest = {
        "model": loaded.info,
        "data": {**describe(cfg.data), "n_seqs": n_seqs},
        "context": cfg.context,
        "prepend_bos": cfg.prepend_bos,
        "bos_rule": packing_rule(cfg.context, cfg.prepend_bos, loaded.bos_token_id, loaded.eos_token_id),
        "config_hash": digest,
        "version": __version__,
        "harvest": {"stop_at_layer": stop, "batch_size": cfg.batch_size, "hooks_order": list(cfg.hooks)},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # lock first: --force must not wipe a store another harvest is still writing
    with writer_lock(url, "harvest"), torch.inference_mode():
        store = ActivationStore.create_or_resume(url, widths, n_rows, cfg.layout(), manifest, force=force)
        todo = store.n_rows - sum(hi - lo for lo, hi in map(store.shard_range, store.done_shards()))  # rows to harvest
        t0 = time.perf_counter()
        if workers or scheduler:
            from compsae.harvest.parallel import harvest_parallel

            harvest_parallel(store, cfg, loaded, tokens, widths, stop, workers=workers or 0, scheduler=scheduler,
                             processes=processes, on_shard_written=on_shard_written)
        else:
            _harvest_into(store, cfg, loaded, tokens, widths, stop, on_shard_written)
        seconds = time.perf_counter() - t0
    # what start-up costs is the process's time minus this line's (benchmarks/peer_saelens.py reads it)
    tqdm.write(f"harvest: {todo:,} tokens in {seconds:.2f} s ({todo / max(seconds, 1e-9):,.0f} tokens/s: forward "
               "passes, writes and finalize; loading and tokenizing not included)")
    return outputs_of(store)


def _harvest_into(store: ActivationStore, cfg: HarvestConfig, loaded: LoadedModel, tokens: np.ndarray,
                  widths: dict[str, int], stop: int | None,
                  on_shard_written: Callable[[int], None] | None) -> list[WriterWaits]:
    """Single-process harvest of every missing shard of `store`, then finalize.  Returns each
    run of shards' waits for the writers."""
    rounding, sample = measure_rounding(cfg, loaded, tokens, widths, stop)
    missing = sorted(set(range(store.n_shards)) - store.done_shards())
    waits = [harvest_shards(store, cfg, loaded, tokens, widths, stop, shards, on_shard_written=on_shard_written,
                            batch0=sample) for shards in missing_runs(missing)]
    store.finalize(extra={"rounding_error": rounding})
    return waits
