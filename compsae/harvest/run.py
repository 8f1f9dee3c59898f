"""`run_harvest`: run the model over the data once and write every hook's activations to a store.

Flow: check model, hooks and context (before touching any store) → tokenize and pack the data up
front (so an empty data set is refused before anything is written, and the row count is exact)
→ open the store to continue it, or create it → forward passes up to the deepest hook, batch by
batch, rows cast to the storage dtype and gathered into shard buffers on the model's device (on a
GPU the shard's range check and statistics are computed there too, and the device → host copy
moves half the bytes) → a background thread writes each full shard through
`ActivationStore.write_shard` (bounded queue: the forward pass never waits on disk unless the disk
is slower than the model) → finalize (merged statistics, rounding error, complete=True).

Resuming: a shard is the unit of completion.  A rerun harvests only the missing shards, each run
of consecutive missing shards from the batch holding its first row.  Batches are always the same
sequence ranges, so a resumed run feeds the model exactly the batches an uninterrupted run does
and writes bit-identical values.  The same property lets `compsae.harvest.parallel` hand shard
ranges to Dask workers (`workers` / `scheduler`): each range is `harvest_shards` on its own.
"""

from __future__ import annotations

import errno
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from compsae import __version__, durable
from compsae.errors import UserError
from compsae.files import STORE_DIR
from compsae.harvest.config import HarvestConfig
from compsae.harvest.data import describe, packing_rule, token_sequences
from compsae.harvest.models import LoadedModel, check_hooks, load_model, special_ids, stop_layer
from compsae.harvest.records import HarvestOutputs
from compsae.store import ActivationStore, manifest_digest, refuse_foreign_folder, store_exists, writer_lock
from compsae.store.activation_store import check_peak, rounding_error

_QUEUE_SHARDS = 2  # shards buffered between the forward pass and the writer
_SAMPLE_ROWS = 4096  # rows of the first batch used to measure the rounding error
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


def tokenize_all(cfg: HarvestConfig, tokenizer: PreTrainedTokenizerBase,
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


class ShardWriter:
    """A background thread that writes full shards to the store from a bounded queue.

    The first error (e.g. float16 overflow, disk full) stops the writer; `put` and `close` raise it
    in the harvesting thread."""

    def __init__(self, store: ActivationStore, tokens: np.ndarray, context: int,
                 on_written: Callable[[int], None] | None = None, first_seq: int = 0) -> None:
        self.store = store
        self.flat_tokens = tokens.reshape(-1)  # [n_seqs_held * context], row 0 = global row row0
        self.row0 = first_seq * context
        self.context = context
        self.on_written = on_written
        self.queue: queue.Queue[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray] | None] | None] = (
            queue.Queue(maxsize=_QUEUE_SHARDS))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="compsae-shard-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain, so the harvesting thread never blocks on a dead writer
            shard, acts, moments = item
            try:
                start, stop = self.store.shard_range(shard)
                rows = np.arange(start, stop, dtype=np.int64)
                self.store.write_shard(shard, acts, tokens=self.flat_tokens[start - self.row0:stop - self.row0],
                                       seq_id=rows // self.context, pos=rows % self.context, moments=moments)
                if self.on_written is not None:
                    self.on_written(shard)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    self.error = UserError(f"disk full while writing shard {shard} of {self.store.url}; "
                                           "free space and rerun the same command to resume")
                else:
                    self.error = e
            except BaseException as e:  # noqa: BLE001 - handed to the harvesting thread
                self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, shard: int, acts: dict[str, np.ndarray], moments: dict[str, np.ndarray] | None = None) -> None:
        """Queue a full shard for writing: `acts[hook]: [rows, d]` (float, or already in the storage
        dtype) and, when known, its `moments[hook]` (see `ActivationStore.write_shard`)."""
        self._raise()
        self.queue.put((shard, acts, moments))

    def close(self) -> None:
        """Wait for every queued shard to be written; raise the writer's error if any."""
        self.queue.put(None)
        self.thread.join()
        self._raise()


def _forward(loaded: LoadedModel, seqs: np.ndarray, hooks: list[str], widths: dict[str, int],
             stop: int | None) -> dict[str, torch.Tensor]:
    """`{hook: [batch * context, width]}` float32 on the model's device for `seqs: [batch, context]`."""
    tokens = torch.from_numpy(seqs).to(device=loaded.device, dtype=torch.long)
    acts = loaded.run_hooks(tokens, hooks, stop)
    return {h: acts[h].reshape(-1, widths[h]).float() for h in hooks}


def device_moments(x: torch.Tensor) -> np.ndarray:
    """`shard_moments` of `x: [rows, d]` computed where `x` lives: [count, mean (d), M2 (d), norm sum]
    float64.  (Reductions on CUDA are deterministic, so a resumed harvest records the same bytes.)"""
    x64 = x.double()
    mean = x64.mean(dim=0)
    m2 = (x64 - mean).square_().sum(dim=0)
    norm_sum = torch.linalg.vector_norm(x64, dim=1).sum()
    count = torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device)
    return torch.cat([count, mean, m2, norm_sum[None]]).cpu().numpy()


class ShardBuffer:
    """One shard of every hook, filled batch by batch on the model's device, in the storage dtype.

    Casting on the device halves the bytes copied to the host; the running peak |x| catches float16
    overflow and NaN without a host pass.  On a GPU the shard's statistics are computed there too
    (a float64 pass over a shard costs the host more than writing it); on the CPU they are left to
    the writer thread, where NumPy's blocked version runs beside the next forward pass."""

    def __init__(self, rows: int, widths: dict[str, int], dtype: str, device: torch.device) -> None:
        self.dtype = dtype
        self.data = {h: torch.empty((rows, w), dtype=_TORCH_DTYPES[dtype], device=device) for h, w in widths.items()}
        self.peak = {h: torch.zeros((), dtype=torch.float32, device=device) for h in widths}

    def fill(self, at: int, acts: dict[str, torch.Tensor]) -> None:
        """Put `acts[hook]: [n, width]` at rows `at .. at + n` of the shard."""
        for h, x in acts.items():
            lo, hi = torch.aminmax(x)  # NaN propagates through aminmax and maximum
            self.peak[h] = torch.maximum(self.peak[h], torch.maximum(hi, -lo))
            self.data[h][at:at + len(x)].copy_(x)

    def finish(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """Range-check the shard and bring it to the host: `({hook: [rows, width]} in the storage
        dtype (bfloat16 as uint16 bits), {hook: moments} or None)`.  Raises on overflow/NaN."""
        peaks = torch.stack(list(self.peak.values())).cpu().tolist()  # waits for the device, once
        for h, peak in zip(self.data, peaks, strict=True):
            check_peak(peak, self.dtype, h)
        on_gpu = next(iter(self.data.values())).device.type != "cpu"
        moments = {h: device_moments(x) for h, x in self.data.items()} if on_gpu else None
        host = {}
        for h, x in self.data.items():
            if self.dtype == "bfloat16":  # NumPy has no bfloat16: its bits, as the store keeps them
                host[h] = x.view(torch.int16).cpu().numpy().view(np.uint16)
            else:
                host[h] = x.cpu().numpy()
        return host, moments


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
    if not force and store_exists(url):
        try:
            existing = ActivationStore.open(url)
        except UserError:
            existing = None
        if existing is not None and existing.complete and existing.manifest.get("config_hash") == digest:
            tqdm.write(f"harvest: {url} is complete for this config; nothing to do")
            return outputs_of(existing)

    loaded, tokens = load_and_tokenize(cfg)  # tokens: [n_seqs, context]
    widths = check_hooks(loaded, cfg.hooks, cfg.context)
    stop = stop_layer(cfg.hooks)
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


def missing_runs(missing: list[int]) -> list[range]:
    """Sorted shard indices as runs of consecutive shards: [0, 1, 2, 5, 6] → [range(0, 3), range(5, 7)]."""
    runs: list[range] = []
    for shard in sorted(missing):
        if runs and runs[-1].stop == shard:
            runs[-1] = range(runs[-1].start, shard + 1)
        else:
            runs.append(range(shard, shard + 1))
    return runs


def batch_span(store: ActivationStore, shards: range, context: int, batch_size: int) -> range:
    """The batches (fixed sequence ranges of `batch_size`) that hold the rows of `shards`."""
    first_row = store.shard_range(shards.start)[0]
    last_row = store.shard_range(shards.stop - 1)[1] - 1
    return range(first_row // context // batch_size, last_row // context // batch_size + 1)


def measure_rounding(cfg: HarvestConfig, loaded: LoadedModel, tokens: np.ndarray, widths: dict[str, int],
                     stop: int | None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Rounding error of the storage dtype per hook, always on batch 0 (so a resumed or parallel
    harvest records the same value); also returns batch 0's activations.  Raises on float16 overflow."""
    hooks = list(cfg.hooks)
    sample = _forward(loaded, tokens[:cfg.batch_size], hooks, widths, stop)
    return {h: rounding_error(sample[h][:_SAMPLE_ROWS].cpu().numpy(), cfg.dtype) for h in hooks}, sample


def harvest_shards(store: ActivationStore, cfg: HarvestConfig, loaded: LoadedModel, tokens: np.ndarray,
                   widths: dict[str, int], stop: int | None, shards: range, first_seq: int = 0,
                   on_shard_written: Callable[[int], None] | None = None,
                   batch0: dict[str, torch.Tensor] | None = None, progress: bool = True) -> None:
    """Run the model over the batches holding `shards` (consecutive) and write those shards.

    `tokens: [n, context]` are sequences `first_seq .. first_seq + n` of the harvest and must cover
    `batch_span(store, shards, ...)`.  A batch is computed whole even when a shard boundary cuts
    it, so every row gets the value an uninterrupted single-process harvest gives it.  `batch0`:
    batch 0's activations when already computed.  Does not finalize the store."""
    hooks, context, bs = list(cfg.hooks), cfg.context, cfg.batch_size
    hook_widths = {h: widths[h] for h in hooks}
    start_row = store.shard_range(shards.start)[0]
    stop_row = store.shard_range(shards.stop - 1)[1]
    n_seqs = store.n_rows // context
    writer = ShardWriter(store, tokens, context, on_shard_written, first_seq=first_seq)
    buffer: ShardBuffer | None = None
    bar = tqdm(total=store.n_rows, initial=start_row, desc=f"harvest {loaded.info['name']}", unit="tok",
               unit_scale=True, dynamic_ncols=True, disable=not progress)
    try:
        for b in batch_span(store, shards, context, bs):
            s0, s1 = b * bs, min((b + 1) * bs, n_seqs)  # global sequence range of batch b
            if b == 0 and batch0 is not None:
                acts = batch0
            else:
                acts = _forward(loaded, tokens[s0 - first_seq:s1 - first_seq], hooks, widths, stop)
            r0, r1 = s0 * context, s1 * context
            lo, hi = max(r0, start_row), min(r1, stop_row)
            bar.update(hi - lo)
            while lo < hi:
                shard = lo // store.shard_rows
                s_start, s_stop = store.shard_range(shard)
                take = min(hi, s_stop) - lo
                if buffer is None:
                    buffer = ShardBuffer(s_stop - s_start, hook_widths, cfg.dtype, loaded.device)
                buffer.fill(lo - s_start, {h: acts[h][lo - r0:lo - r0 + take] for h in hooks})
                lo += take
                if lo == s_stop:
                    writer.put(shard, *buffer.finish())
                    buffer = None
    finally:
        bar.close()
        writer.close()  # even on error: shards already queued are written, nothing is lost


def _harvest_into(store: ActivationStore, cfg: HarvestConfig, loaded: LoadedModel, tokens: np.ndarray,
                  widths: dict[str, int], stop: int | None, on_shard_written: Callable[[int], None] | None) -> None:
    """Single-process harvest of every missing shard of `store`, then finalize."""
    rounding, sample = measure_rounding(cfg, loaded, tokens, widths, stop)
    missing = sorted(set(range(store.n_shards)) - store.done_shards())
    for shards in missing_runs(missing):
        harvest_shards(store, cfg, loaded, tokens, widths, stop, shards, on_shard_written=on_shard_written,
                       batch0=sample)
    store.finalize(extra={"rounding_error": rounding})
