"""`BatchLoader`: shuffled float32 batches of one hook's activations, straight from chunk bytes.

Per epoch the store's chunks are put in a random order and taken `mix_chunks` at a time (a
*window*).  A window's selected rows are gathered from the memory-mapped chunks (in parallel
threads) into one float32 block in a random order and cut into batches; the rows left over at the
end of a window open the next one, so every selected row is served exactly once per epoch and a
batch mixes rows of many chunks (many sequences).  A background thread prepares the next windows
while the current one is consumed; on CUDA a window is pinned once and batches are copied with
`non_blocking=True`.

Everything is a function of (seed, epoch), so the stream is reproducible and its position is two
integers: `state_dict()` -> {"epoch", "batch", ...}, `load_state_dict()` restarts there."""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch

from compsae.errors import UserError
from compsae.store.activation_store import ActivationStore, from_storage
from compsae.store.split import DEFAULT_SPLIT_SEED, heldout_parts

Split = Literal["train", "heldout", "all"]
_DONE = object()


class BatchLoader:
    """Iterate `torch.Tensor [batch_size, d_model]` float32 batches of `hook` from `store`.

    `split` "train" serves the rows whose sequence is not held out, "heldout" only those, "all"
    every row.  `normalize` scales every row by one factor so the mean row norm becomes
    sqrt(d_model) (the factor is `self.scale`, from the store's statistics).  `epochs=None` cycles
    forever; the last batch of an epoch may be smaller unless `drop_last`.  `split_seed` picks the
    held-out sequences (training records it with the checkpoint, as `HeldOutSplit`).

    `part=(rank, world)` (a data-parallel job): the global batches stay the same, but only rank's
    contiguous share of each is read and yielded (sizes differ by at most one, rank order, as
    `DistContext.local_rows`; a share can be empty when a batch has fewer rows than ranks)."""

    def __init__(
        self,
        store: ActivationStore | str,
        hook: str,
        batch_size: int = 512,
        split: Split = "train",
        heldout_fraction: float = 0.05,
        seed: int = 0,
        device: str | torch.device = "cpu",
        normalize: bool = False,
        shuffle: bool = True,
        mix_chunks: int = 16,
        num_threads: int = 2,
        prefetch: int = 2,
        epochs: int | None = None,
        drop_last: bool = False,
        split_seed: int = DEFAULT_SPLIT_SEED,
        part: tuple[int, int] = (0, 1),
    ) -> None:
        self.store = ActivationStore.open(store) if isinstance(store, str) else store
        if hook not in self.store.hooks:
            raise UserError(
                f"the store at {self.store.url} has no hook {hook!r} (it holds "
                f"{', '.join(self.store.hooks)}); set train.hook to one of them"
            )
        if split not in ("train", "heldout", "all"):
            raise UserError(f"split must be train, heldout or all, not {split!r}")
        self.hook = hook
        self.batch_size = batch_size
        self.rank, self.world = part
        if not 0 <= self.rank < self.world:
            raise ValueError(f"part {part} is not (rank, world size) with 0 <= rank < world size")
        self.split = split
        self.heldout_fraction = heldout_fraction
        self.seed = seed
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.mix_chunks = max(1, mix_chunks)
        self.num_threads = max(1, num_threads)
        self.prefetch = max(1, prefetch)
        self.epochs = epochs
        self.drop_last = drop_last
        self.d_model = self.store.d_model(hook)
        self.chunk_rows = self.store.chunk_rows

        # The split has its own seed (not the shuffle seed): training and evaluation runs with
        # different seeds must still agree on which sequences are held out.
        self._keep_bits, self._chunk_counts = self._selection(split, heldout_fraction, split_seed)
        self.n_rows = int(self._chunk_counts.sum())
        if self.n_rows < batch_size:
            raise UserError(
                f"batch_size {batch_size} is larger than the {self.n_rows} {split} rows of "
                f"{self.store.url}; "
                "lower train.batch_size or harvest more tokens"
            )
        self.scale = 1.0
        if normalize:
            mean_norm = float(self.store.stats(hook)["mean_norm"])
            if not mean_norm > 0:
                raise UserError(
                    f"{self.store.url}: hook {hook} has mean norm {mean_norm}; cannot normalise"
                )
            self.scale = math.sqrt(self.d_model) / mean_norm
        self._epoch = 0
        self._batch = 0  # batches handed out in the current epoch

    # -- position ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch."""
        return (
            self.n_rows // self.batch_size if self.drop_last else -(-self.n_rows // self.batch_size)
        )

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream (JSON-able): the next batch is batch `batch` of `epoch`."""
        return {
            "epoch": self._epoch,
            "batch": self._batch,
            "seed": self.seed,
            "n_rows": self.n_rows,
            "batch_size": self.batch_size,
            "split": self.split,
            "shuffle": self.shuffle,
            "mix_chunks": self.mix_chunks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by `state_dict()` (on the same store and settings)."""
        for key in ("seed", "n_rows", "batch_size", "split", "shuffle", "mix_chunks"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(
                    f"saved loader position has {key}={state[key]!r} but this loader has "
                    f"{getattr(self, key)!r}; the checkpoint belongs to another store or config"
                )
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

    # -- planning (indices only, no data) ---------------------------------------------------------

    def _selection(
        self, split: Split, fraction: float, split_seed: int
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """Which rows `split` serves: one bit per row of the store (`[ceil(n_rows / 8)]` uint8,
        packed big-endian as `np.packbits`; None for "all") and the count per chunk `[n_chunks]`.

        Read shard by shard: a bit per row is what a billion-row store costs here (125 MB), where
        its sequence ids alone are 8 GB."""
        n_rows, cr, n_chunks = self.store.n_rows, self.chunk_rows, self.store.n_chunks
        if split == "all":
            counts = np.full(n_chunks, cr, dtype=np.int64)
            counts[-1] = n_rows - (n_chunks - 1) * cr
            return None, counts
        bits = np.zeros(-(-n_rows // 8), dtype=np.uint8)
        counts = np.zeros(n_chunks, dtype=np.int64)
        pending = np.zeros(0, dtype=bool)  # rows after the last whole byte written
        for lo, held in heldout_parts(self.store, fraction, split_seed):
            keep = held if split == "heldout" else ~held
            # a shard is whole chunks (the store's last one may end inside its last chunk)
            padded = np.zeros(-(-len(keep) // cr) * cr, dtype=np.int64)
            padded[: len(keep)] = keep
            counts[lo // cr : lo // cr + len(padded) // cr] = padded.reshape(-1, cr).sum(axis=1)
            joined = np.concatenate([pending, keep])
            whole = len(joined) // 8 * 8
            first_byte = (lo - len(pending)) // 8
            bits[first_byte : first_byte + whole // 8] = np.packbits(joined[:whole])
            pending = joined[whole:]
        if len(pending):
            bits[-1] = np.packbits(pending)[0]
        return bits, counts

    def _selected(self, chunk: int) -> np.ndarray:
        """Row offsets within `chunk` of the rows this loader serves."""
        lo = chunk * self.chunk_rows
        hi = min(lo + self.chunk_rows, self.store.n_rows)
        if self._keep_bits is None:
            return np.arange(hi - lo)
        first_byte = lo // 8
        keep = np.unpackbits(self._keep_bits[first_byte : -(-hi // 8)])
        return np.flatnonzero(keep[lo - 8 * first_byte : hi - 8 * first_byte])

    def _windows(self, epoch: int) -> list[np.ndarray]:
        """Chunk ids of each window of `epoch`, in serving order (chunks without selected rows
        dropped)."""
        chunks = np.flatnonzero(self._chunk_counts).astype(np.int64)
        if self.shuffle:
            chunks = np.random.default_rng([self.seed, epoch]).permutation(chunks)
        return [chunks[i : i + self.mix_chunks] for i in range(0, len(chunks), self.mix_chunks)]

    def _window_rows(self, epoch: int, w: int, chunks: np.ndarray) -> np.ndarray:
        """Global row ids of window `w`, in serving order."""
        rows = np.concatenate([c * self.chunk_rows + self._selected(c) for c in chunks])
        if self.shuffle:
            rows = np.random.default_rng([self.seed, epoch, w]).permutation(rows)
        return rows

    # -- reading ----------------------------------------------------------------------------------

    def _gather(
        self, rows: np.ndarray, pool: ThreadPoolExecutor, prefix: np.ndarray | None = None
    ) -> np.ndarray:
        """`rows: [r]` global ids -> float32 `[len(prefix) + r, d]` (already-read `prefix` rows
        first), read chunk by chunk from raw chunk bytes."""
        n_pre = 0 if prefix is None else len(prefix)
        block = np.empty((n_pre + len(rows), self.d_model), dtype=np.float32)
        if n_pre:
            block[:n_pre] = prefix
        out = block[n_pre:]
        if not len(rows):
            return block
        chunk_of = rows // self.chunk_rows
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
        groups = np.split(order, bounds)  # positions in `rows`, one group per chunk
        dtype = self.store.layout.dtype

        def fill(pos: np.ndarray) -> None:
            c = int(chunk_of[pos[0]])
            raw = self.store.read_chunk_raw(self.hook, c)
            picked = raw[rows[pos] - c * self.chunk_rows]
            # float16 / float32 convert during the scatter; bfloat16 bits need the shift first
            out[pos] = from_storage(picked, dtype) if dtype == "bfloat16" else picked

        list(pool.map(fill, groups))
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        return block

    def _share(self, n: int) -> slice:
        """This part's rows of a batch of `n` rows."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def _epoch_blocks(
        self, epoch: int, skip: int, pool: ThreadPoolExecutor
    ) -> Iterator[tuple[np.ndarray, list[int]]]:
        """Yield (block `[r, d]`, rows of each batch in it) per window of `epoch`, already past the
        first `skip` batches; a block holds exactly the rows of its batches (this part's share of
        each), in order."""
        if self.world > 1:
            yield from self._epoch_shares(epoch, skip, pool)
            return
        bs = self.batch_size
        windows = self._windows(epoch)
        carry_rows = np.empty(0, dtype=np.int64)
        carry_data: np.ndarray | None = np.empty((0, self.d_model), dtype=np.float32)
        done = 0
        for w, chunks in enumerate(windows):
            rows = self._window_rows(epoch, w, chunks)
            avail = len(carry_rows) + len(rows)
            n_batches = avail // bs
            if w == len(windows) - 1 and avail % bs and not self.drop_last:
                n_batches += 1
            used = min(n_batches * bs, avail)
            if done + n_batches <= skip:  # whole window already served: plan only, read nothing
                carry_rows = np.concatenate([carry_rows, rows])[used:]
                carry_data = None
                done += n_batches
                continue
            if carry_data is None:  # resuming inside this window: the carried rows are needed again
                carry_data = self._gather(carry_rows, pool)
            data = self._gather(rows, pool, prefix=carry_data)  # carried rows first, no extra copy
            all_rows = np.concatenate([carry_rows, rows])
            first = max(0, skip - done)
            yield data[first * bs : used], [min(bs, used - j * bs) for j in range(first, n_batches)]
            carry_rows, carry_data = all_rows[used:], data[used:]
            done += n_batches

    def _epoch_shares(
        self, epoch: int, skip: int, pool: ThreadPoolExecutor
    ) -> Iterator[tuple[np.ndarray, list[int]]]:
        """`_epoch_blocks` of one part: the same batches planned, only this part's rows of each
        read."""
        bs = self.batch_size
        windows = self._windows(epoch)
        carry_rows = np.empty(0, dtype=np.int64)  # planned rows of the next window's first batch
        done = 0
        for w, chunks in enumerate(windows):
            all_rows = np.concatenate([carry_rows, self._window_rows(epoch, w, chunks)])
            n_batches = len(all_rows) // bs
            if w == len(windows) - 1 and len(all_rows) % bs and not self.drop_last:
                n_batches += 1
            used = min(n_batches * bs, len(all_rows))
            if done + n_batches > skip:
                picks, lengths = [], []
                for j in range(max(0, skip - done), n_batches):
                    lo = j * bs
                    share = self._share(min(bs, used - lo))
                    picks.append(all_rows[lo + share.start : lo + share.stop])
                    lengths.append(share.stop - share.start)
                yield self._gather(np.concatenate(picks), pool), lengths
            carry_rows = all_rows[used:]
            done += n_batches

    # -- iteration --------------------------------------------------------------------------------

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        pin = self.device.type == "cuda"
        try:
            with ThreadPoolExecutor(self.num_threads, thread_name_prefix="compsae-loader") as pool:
                epoch, skip = self._epoch, self._batch
                while self.epochs is None or epoch < self.epochs:
                    for block, lengths in self._epoch_blocks(epoch, skip, pool):
                        tensor = torch.from_numpy(block)
                        if pin:
                            tensor = tensor.pin_memory()
                        while not stop.is_set():
                            try:
                                out.put((epoch, tensor, lengths), timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
                    epoch, skip = epoch + 1, 0
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            out.put((None, e, []))
            return
        out.put((None, _DONE, []))

    def __iter__(self) -> Iterator[torch.Tensor]:
        blocks: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        producer = threading.Thread(
            target=self._produce, args=(blocks, stop), daemon=True, name="compsae-loader-producer"
        )
        producer.start()
        try:
            while True:
                epoch, block, lengths = blocks.get()
                if epoch is None:
                    if block is _DONE:
                        return
                    raise block
                if epoch != self._epoch:
                    self._epoch, self._batch = epoch, 0
                at = 0
                for n in lengths:
                    batch = block[at : at + n]
                    at += n
                    if self.device.type != "cpu":
                        batch = batch.to(self.device, non_blocking=True)
                    self._batch += (
                        1  # counted before the yield: a checkpoint taken now resumes after it
                    )
                    if self._batch == len(self):
                        self._epoch, self._batch = self._epoch + 1, 0
                    yield batch
        finally:
            stop.set()
            producer.join(timeout=5)
