"""Writing shards: forward passes over fixed batches, rows gathered into shard buffers on the
model's device, copied to the host and written by a background thread.

Shared by the single-process harvest (`compsae.harvest.run`) and the parallel one
(`compsae.harvest.parallel`): both harvest shard ranges with `harvest_shards`, so a resumed or a
parallel harvest feeds the model exactly the batches an uninterrupted run does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from compsae.errors import UserError
from compsae.harvest.config import HarvestConfig
from compsae.harvest.token_feed import TokenFeed
from compsae.harvest.verdicts import Clock, writers_busy_share, writers_verdict
from compsae.lm.models import LoadedModel
from compsae.store import ActivationStore
from compsae.store.activation_store import check_peak

_QUEUE_SHARDS = 2  # shards buffered between the forward pass and the writer
_SAMPLE_ROWS = 4096  # rows of the first batch used to measure the rounding error
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class HostShard:
    """A shard on its way to the host (see `HostStaging.stage`).  The writer thread calls `wait`
    (the device → host copy is done), `check` (float16 overflow / NaN), reads `acts` and
    `moments`, then `release` (the host buffers go back to the pool)."""

    acts: dict[
        str, np.ndarray
    ]  # {hook: [rows, width]} in the storage dtype (bfloat16 as uint16 bits)
    moments: dict[str, np.ndarray] | None  # {hook: shard moments} when computed on the device
    peaks: np.ndarray  # [n_hooks] float32: max |x| per hook, NaN when a value was NaN
    dtype: str
    done: Any = None  # torch.cuda.Event of the copy, None when the data is already on the host
    release: Callable[[], None] = lambda: None

    def wait(self) -> None:
        """Block until the copy to the host has finished (releases the GIL meanwhile)."""
        if self.done is not None:
            self.done.synchronize()

    def check(self) -> None:
        """Raise a UserError when a hook overflows the storage dtype or holds NaN / inf."""
        for h, peak in zip(self.acts, self.peaks.tolist(), strict=True):
            check_peak(peak, self.dtype, h)


def _numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A host tensor in the storage dtype as NumPy, without a copy (bfloat16 as its uint16 bits)."""
    return x.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else x.numpy()


class HostStaging:
    """Host buffers for shards leaving a GPU, reused from a pool of `slots`, and the side CUDA
    stream that copies into them.

    The copy waits (on the GPU) for the kernels that filled the shard, runs beside the next batches'
    forward passes and signals an event the writer thread waits on: the harvesting thread never
    waits for the device.  Buffers are pinned when CUDA is there (pinned memory is what lets a copy
    run asynchronously); when every slot is still being written, `stage` blocks, which bounds the
    host memory.  Without CUDA the same code copies synchronously into ordinary memory (tests)."""

    def __init__(
        self,
        shard_rows: int,
        widths: dict[str, int],
        dtype: str,
        device: torch.device,
        slots: int = _QUEUE_SHARDS + 2,
    ) -> None:
        self.dtype, self.device = dtype, device
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.free: queue.Queue[dict[str, Any]] = queue.Queue()
        for _ in range(slots):
            self.free.put(
                {
                    "acts": {
                        h: torch.empty((shard_rows, w), dtype=_TORCH_DTYPES[dtype], pin_memory=cuda)
                        for h, w in widths.items()
                    },
                    "moments": {
                        h: torch.empty(2 * w + 2, dtype=torch.float64, pin_memory=cuda)
                        for h, w in widths.items()
                    },
                    "peaks": torch.empty(len(widths), dtype=torch.float32, pin_memory=cuda),
                }
            )

    def stage(
        self,
        data: dict[str, torch.Tensor],
        peaks: torch.Tensor,
        moments: dict[str, torch.Tensor] | None,
    ) -> HostShard:
        """Start copying a shard (`data[hook]: [rows, width]`, `peaks: [n_hooks]`, `moments[hook]`,
        all on the device) into a free host slot; returns at once on a GPU."""
        slot = self.free.get()
        rows = next(iter(data.values())).shape[0]
        done = None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        ):
            sources = [(slot["acts"][h][:rows], x) for h, x in data.items()] + [
                (slot["peaks"], peaks)
            ]
            sources += [(slot["moments"][h], m) for h, m in (moments or {}).items()]
            for dst, src in sources:
                dst.copy_(src, non_blocking=self.stream is not None)
                if self.stream is not None:
                    src.record_stream(
                        self.stream
                    )  # the allocator must not reuse it before the copy ends
            if self.stream is not None:
                done = torch.cuda.Event()
                done.record(self.stream)
        return HostShard(
            acts={h: _numpy(slot["acts"][h][:rows], self.dtype) for h in data},
            moments={h: slot["moments"][h].numpy() for h in moments}
            if moments is not None
            else None,
            peaks=slot["peaks"].numpy(),
            dtype=self.dtype,
            done=done,
            release=lambda: self.free.put(slot),
        )


def writer_threads(cfg: HarvestConfig, device: torch.device) -> int:
    """How many threads write shards (`harvest.writer_threads`; see its description for auto)."""
    if cfg.writer_threads != "auto":
        return int(cfg.writer_threads)
    # the cores this process may run on (a job pinned to some of a machine's cores has fewer than
    # cpu_count)
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return 1 if device.type != "cuda" else max(1, min(4, cores // 4))


class ShardWriter:
    """Background threads that write full shards to the store from a bounded queue.

    One thread stored about 0.6 GB/s of activations on a GPU machine, and a profile here puts most
    of a writer's time in the kernel's copy in `writev`, which releases the GIL; a GPU harvests a
    small model faster than one writer stores it, so `threads` writers
    can take shards side by side: every shard is its own files and completion mark, so the order
    they finish in does not matter (a resumed harvest writes whatever is missing).  The first error
    (e.g. float16 overflow, disk full) stops the writers; `put` and `close` raise it in the
    harvesting thread.  `clock` times the writes (`busy_s`)."""

    def __init__(
        self,
        store: ActivationStore,
        context: int,
        on_written: Callable[[int], None] | None = None,
        threads: int = 1,
        depth: int = _QUEUE_SHARDS,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.store = store
        self.clock = clock
        self.context = context
        self.on_written = on_written
        self.queue: queue.Queue[tuple[int, HostShard, np.ndarray] | None] = queue.Queue(
            maxsize=depth
        )
        self.error: BaseException | None = None
        self.busy_s = 0.0  # seconds the threads spent writing (not waiting for shards or the GPU)
        self._lock = threading.Lock()  # the first error, busy_s, and one on_written call at a time
        self.threads = [
            threading.Thread(target=self._loop, name=f"compsae-shard-writer-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self.threads:
            thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            shard, host, tokens = item
            try:
                if self.error is not None:
                    continue  # drain, so the harvesting thread never blocks on a dead writer
                host.wait()
                t0 = self.clock()
                host.check()
                start, stop = self.store.shard_range(shard)
                rows = np.arange(start, stop, dtype=np.int64)
                self.store.write_shard(
                    shard,
                    host.acts,
                    tokens=tokens,
                    seq_id=rows // self.context,
                    pos=rows % self.context,
                    moments=host.moments,
                    checked=True,
                )
                with self._lock:
                    self.busy_s += self.clock() - t0
                    if self.on_written is not None:
                        self.on_written(shard)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    self._fail(
                        UserError(
                            f"disk full while writing shard {shard} of {self.store.url}; "
                            "free space and rerun the same command to resume"
                        )
                    )
                else:
                    self._fail(e)
            except BaseException as e:  # noqa: BLE001 - handed to the harvesting thread
                self._fail(e)
            finally:
                host.release()

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, shard: int, host: HostShard, tokens: np.ndarray) -> None:
        """Queue a full shard for writing (see `HostShard`; `tokens: [rows]` its token ids);
        raises the writer's error, if any, instead (handing the shard's host buffers back)."""
        if self.error is not None:
            host.release()
            raise self.error
        self.queue.put((shard, host, tokens))

    def close(self) -> None:
        """Wait for every queued shard to be written; raise the writers' first error if any."""
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        self._raise()


def device_tokens(seqs: np.ndarray, device: torch.device) -> torch.Tensor:
    """`seqs: [batch, context]` as int64 on `device`.  To a GPU through pinned memory, without
    waiting: a copy from pageable memory first waits for the GPU's queue to drain, so every batch
    left the GPU idle while the harvesting thread (sharing the GIL with the writers) launched the
    next one."""
    ids = torch.from_numpy(np.ascontiguousarray(seqs))
    if device.type != "cuda":
        return ids.to(dtype=torch.long)
    return ids.pin_memory().to(device, non_blocking=True).long()


def _forward(
    loaded: LoadedModel,
    seqs: np.ndarray,
    hooks: list[str],
    widths: dict[str, int],
    stop: int | None,
) -> dict[str, torch.Tensor]:
    """`{hook: [batch * context, width]}` float32 on the model's device for `seqs: [batch,
    context]`."""
    acts = loaded.run_hooks(device_tokens(seqs, loaded.device), hooks, stop)
    return {h: acts[h].reshape(-1, widths[h]).float() for h in hooks}


@dataclass(frozen=True)
class WriterWaits:
    """Seconds of a `harvest_shards` call: `blocked` handing shards over to a full queue (the
    harvesting thread is ahead of the GPU or of the writers), `tail` writing the last shards after
    the last forward pass, `total` the whole call; `writer_busy` the share of the writer threads'
    time spent writing (near 1: the disk or their number limits the harvest)."""

    blocked: float
    tail: float
    total: float
    writer_busy: float


def device_moments(x: torch.Tensor) -> torch.Tensor:
    """`shard_moments` of `x: [rows, d]` computed where `x` lives: [count, mean (d), M2 (d), norm
    sum] float64, on `x`'s device.  (Reductions on CUDA are deterministic, so a resumed harvest
    records the same bytes.)"""
    x64 = x.double()
    mean = x64.mean(dim=0)
    m2 = (x64 - mean).square_().sum(dim=0)
    norm_sum = torch.linalg.vector_norm(x64, dim=1).sum()
    # filled on the device: torch.tensor([...], device=cuda) copies from pageable memory, which
    # first waits for everything queued on the GPU
    count = torch.full((1,), float(x.shape[0]), dtype=torch.float64, device=x.device)
    return torch.cat([count, mean, m2, norm_sum[None]])


class ShardBuffer:
    """One shard of every hook, filled batch by batch on the model's device, in the storage dtype.

    Casting on the device halves the bytes copied to the host; the running peak |x| catches float16
    overflow and NaN without a host pass.  On a GPU the shard's statistics are computed there too
    (a float64 pass over a shard costs the host more than writing it); on the CPU they are left to
    the writer thread, where NumPy's blocked version runs beside the next forward pass."""

    def __init__(self, rows: int, widths: dict[str, int], dtype: str, device: torch.device) -> None:
        self.dtype = dtype
        self.data = {
            h: torch.empty((rows, w), dtype=_TORCH_DTYPES[dtype], device=device)
            for h, w in widths.items()
        }
        self.peak = {h: torch.zeros((), dtype=torch.float32, device=device) for h in widths}

    def fill(self, at: int, acts: dict[str, torch.Tensor]) -> None:
        """Put `acts[hook]: [n, width]` at rows `at .. at + n` of the shard."""
        for h, x in acts.items():
            lo, hi = torch.aminmax(x)  # NaN propagates through aminmax and maximum
            self.peak[h] = torch.maximum(self.peak[h], torch.maximum(hi, -lo))
            self.data[h][at : at + len(x)].copy_(x)

    def cut(self, rows: int) -> None:
        """Keep only the first `rows` rows (the shard turned out shorter: the data ran out)."""
        self.data = {h: x[:rows] for h, x in self.data.items()}

    def finish(self, staging: HostStaging | None = None) -> HostShard:
        """Hand the shard to the host: through `staging` (a GPU: asynchronous, statistics computed
        on the device), else as views of the buffer itself (the CPU: no copy, statistics left to
        the writer).  Nothing here waits for the device; the range check is `HostShard.check`."""
        peaks = torch.stack(list(self.peak.values()))
        on_gpu = next(iter(self.data.values())).device.type == "cuda"
        moments = {h: device_moments(x) for h, x in self.data.items()} if on_gpu else None
        if staging is None:
            # x.cpu() is the buffer itself on the CPU; a GPU buffer without staging is copied
            # (synchronously)
            return HostShard(
                acts={h: _numpy(x.cpu(), self.dtype) for h, x in self.data.items()},
                moments={h: m.cpu().numpy() for h, m in moments.items()}
                if moments is not None
                else None,
                peaks=peaks.cpu().numpy(),
                dtype=self.dtype,
            )
        return staging.stage(self.data, peaks, moments)


def queue_depth(batch_rows: int, shard_rows: int) -> int:
    """Shards queued between the forward passes and the writers: two batches' worth, at least
    `_QUEUE_SHARDS`.  A batch that ends several shards must hand them all over without waiting
    for a writer, or the GPU idles while the host writes (on an H200, a 1,024-sequence batch
    ending 8 shards held the harvest to 0.4-0.64 of the bare forward with a queue of 2)."""
    per_batch = -(-batch_rows // shard_rows) + 1  # a batch can straddle one more shard boundary
    return max(_QUEUE_SHARDS, 2 * per_batch)


def missing_runs(missing: list[int]) -> list[range]:
    """Sorted shard indices as runs of consecutive shards: [0, 1, 2, 5, 6] → [range(0, 3), range(5,
    7)]."""
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


def measure_rounding(
    cfg: HarvestConfig,
    loaded: LoadedModel,
    tokens: np.ndarray,
    widths: dict[str, int],
    stop: int | None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Rounding error of the storage dtype per hook, always on batch 0 (so a resumed or parallel
    harvest records the same value); also returns batch 0's activations.  Raises on float16
    overflow."""
    hooks = list(cfg.hooks)
    sample = _forward(loaded, tokens[: cfg.batch_size], hooks, widths, stop)
    return {h: rounding_error(sample[h][:_SAMPLE_ROWS], cfg.dtype, h) for h in hooks}, sample


def rounding_error(x: torch.Tensor, dtype: str, hook: str) -> float:
    """Relative L2 error ‖x − q(x)‖ / ‖x‖ of storing `x: [rows, d]` in `dtype`, cast as the shard
    buffer casts it, where `x` lives (a host pass over the sample cost a short GPU harvest 5-10 %).
    Raises the one-line error when `x` overflows float16 or holds NaN / inf."""
    check_peak(float(x.abs().max()) if x.numel() else 0.0, dtype, hook)
    x64 = x.double()
    error = torch.linalg.vector_norm(x64 - x.to(_TORCH_DTYPES[dtype]).double())
    return float(error) / (float(torch.linalg.vector_norm(x64)) or 1.0)


def harvest_shards(
    store: ActivationStore,
    cfg: HarvestConfig,
    loaded: LoadedModel,
    tokens: TokenFeed | np.ndarray,
    widths: dict[str, int],
    stop: int | None,
    shards: range,
    first_seq: int = 0,
    on_shard_written: Callable[[int], None] | None = None,
    batch0: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    clock: Clock = time.perf_counter,
) -> WriterWaits:
    """Run the model over the batches holding `shards` (consecutive) and write those shards.

    `tokens: [n, context]` are sequences `first_seq .. first_seq + n` of the harvest and must cover
    `batch_span(store, shards, ...)`; a `TokenFeed` (first_seq 0) may still be filling, and each
    batch waits for its sequences (and releases those no shard still needs).  When the feed's data
    runs out before the store's rows, the store shrinks to the last whole sequence and the shard
    holding it is written partial.  A batch is computed whole even when a shard boundary cuts it,
    so every row gets the value an uninterrupted single-process harvest gives it.  `batch0`: batch
    0's activations when already computed.  Does not finalize the store.  Returns how long the loop
    waited for the writers, as `clock` measures it (`compsae.harvest.verdicts`)."""
    feed = tokens if isinstance(tokens, TokenFeed) else TokenFeed.of(tokens)
    hooks, context, bs = list(cfg.hooks), cfg.context, cfg.batch_size
    hook_widths = {h: widths[h] for h in hooks}
    start_row = store.shard_range(shards.start)[0]
    stop_row = store.shard_range(shards.stop - 1)[1]
    n_seqs = store.n_rows // context
    threads = writer_threads(cfg, loaded.device)
    depth = queue_depth(bs * context, store.shard_rows)
    # the phases are named for torch.profiler (benchmarks/harvest.py --profile charges the GPU's
    # idle time to them); a name costs microseconds when no profiler runs
    with record_function("harvest.setup"):
        writer = ShardWriter(
            store, context, on_shard_written, threads=threads, depth=depth, clock=clock
        )
        # a GPU's shards reach the host through pinned buffers on a side stream; a CPU's are on it
        # already (a slot per writer thread, per queued shard, and one being filled)
        staging = (
            HostStaging(
                store.shard_rows, hook_widths, cfg.dtype, loaded.device, slots=depth + threads + 1
            )
            if loaded.device.type == "cuda"
            else None
        )
    row0 = first_seq * context  # the feed's row 0 in the store
    buffer: ShardBuffer | None = None
    buffer_shard = -1
    blocked = 0.0  # seconds the harvesting thread spent blocked handing shards over
    t_start = clock()

    def hand_over(shard: int, filled: ShardBuffer) -> float:
        """Queue a filled shard with its token ids; returns the seconds `put` blocked."""
        lo_row, hi_row = store.shard_range(shard)
        with record_function("harvest.finish"):
            host, tokens_of_shard = (
                filled.finish(staging),
                feed.token_rows(lo_row - row0, hi_row - row0),
            )
        t0 = clock()
        with record_function("harvest.put"):
            writer.put(shard, host, tokens_of_shard)
        return clock() - t0

    bar = tqdm(
        total=store.n_rows,
        initial=start_row,
        desc=f"harvest {loaded.info['name']}",
        unit="tok",
        unit_scale=True,
        dynamic_ncols=True,
        disable=not progress,
    )
    try:
        for b in batch_span(store, shards, context, bs):
            s0, s1 = b * bs, min((b + 1) * bs, n_seqs)  # global sequence range of batch b
            if s0 >= n_seqs:
                break  # the data ran out in an earlier batch
            # what is still needed starts at this batch, or at the shard being filled
            held = s0 if buffer is None else min(s0, store.shard_range(buffer_shard)[0] // context)
            feed.release(held - first_seq)
            with record_function("harvest.wait_tokens"):
                ready = feed.wait_for(s1 - first_seq) + first_seq
            if ready < s1:  # the data ran out: the store ends with its last whole sequence
                n_seqs = s1 = ready
                store.shrink(
                    n_seqs * context, {"data": {**store.manifest.get("data", {}), "n_seqs": n_seqs}}
                )
                stop_row = min(stop_row, store.n_rows)
                bar.total = store.n_rows
                if buffer is not None:
                    b_start, b_stop = store.shard_range(buffer_shard)
                    buffer.cut(b_stop - b_start)
                    if s0 * context == b_stop:  # the shard being filled ends where the data does
                        blocked += hand_over(buffer_shard, buffer)
                        buffer = None
                if s0 >= s1:
                    break
            if b == 0 and batch0 is not None:
                acts = batch0
            else:
                with record_function("harvest.forward"):
                    acts = _forward(
                        loaded, feed.seqs(s0 - first_seq, s1 - first_seq), hooks, widths, stop
                    )
            r0, r1 = s0 * context, s1 * context
            lo, hi = max(r0, start_row), min(r1, stop_row)
            bar.update(hi - lo)
            while lo < hi:
                shard = lo // store.shard_rows
                s_start, s_stop = store.shard_range(shard)
                take = min(hi, s_stop) - lo
                if buffer is None:
                    buffer = ShardBuffer(s_stop - s_start, hook_widths, cfg.dtype, loaded.device)
                    buffer_shard = shard
                with record_function("harvest.fill"):
                    buffer.fill(lo - s_start, {h: acts[h][lo - r0 : lo - r0 + take] for h in hooks})
                lo += take
                if lo == s_stop:
                    blocked += hand_over(shard, buffer)
                    buffer = None
    finally:
        bar.close()
        t0 = clock()
        with record_function("harvest.last_writes"):
            writer.close()  # even on error: shards already queued are written, nothing is lost
        tail = clock() - t0
    total = clock() - t_start
    timing = WriterWaits(blocked, tail, total, writers_busy_share(writer.busy_s, threads, total))
    verdict = writers_verdict(timing.writer_busy, total, threads)
    if progress and verdict is not None:
        tqdm.write(verdict)
    return timing
