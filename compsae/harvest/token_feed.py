"""`TokenFeed`: the harvest's token sequences, tokenized by a background thread while the model
loads and the forward passes run, held in a bounded window.

A harvest used to wait for every token before its first forward pass (about 1 s per million
tokens on 2 cores: as long as the loop itself on a GPU that harvests ~1M tokens/s), and held
every token id in memory (4 bytes per token: 4 GB at 1B tokens).  The feed fills a ring of
`window` sequences in order; a reader asks for sequences and waits only until they are there, and
releases the ones it is done with so the tokenizer can go on.  The same generator fills it
whether read early or late, so the sequences, and the batches made of them, are the ones
`tokenize_all` gives.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from compsae.errors import UserError
from compsae.harvest.config import HarvestConfig
from compsae.harvest.data import token_sequences
from compsae.harvest.verdicts import Clock
from compsae.lm.models import special_ids

WINDOW_TOKENS = 1 << 24  # a single-process harvest holds at most this many token ids ahead (64 MB)


class TokenFeed:
    """Token sequences `0 .. n_seqs` ([context] int32 each), of which the first `ready` are
    tokenized; sequences before `released` may be overwritten by later ones (a ring of `window`).

    `wait_for(n)` blocks until `n` sequences are there or the data has run out (then fewer);
    `seqs(a, b)` reads tokenized ones, `release(a)` gives back those before `a`.  An error in the
    tokenizing thread is raised by `wait_for` once a reader needs a sequence it did not reach."""

    def __init__(
        self,
        slots: np.ndarray,
        n_seqs: int,
        ready: int,
        done: bool,
        clock: Clock = time.perf_counter,
    ) -> None:
        self._slots = slots  # [window, context]: sequence i lives at i % window
        self.n_seqs = n_seqs  # asked; fewer are tokenized when the data runs out
        self.ready = ready
        self.done = done
        self.released = 0
        self.error: BaseException | None = None
        self.waited_s = 0.0  # seconds readers spent waiting for sequences not yet tokenized
        self.clock = clock  # what `waited_s` is measured with
        # how many sequences a reader blocked in `wait_for` needs (0: none is blocked); a test's
        # tokenizer can wait for a blocked reader, so what it measures is not left to scheduling
        self.wanted = 0
        self._cond = threading.Condition()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def of(cls, tokens: np.ndarray) -> TokenFeed:
        """A feed of sequences already tokenized (`tokens: [n, context]`)."""
        return cls(tokens, len(tokens), len(tokens), done=True)

    @classmethod
    def start(
        cls,
        cfg: HarvestConfig,
        tokenizer: Any,
        window: int | None = None,
        progress: bool = False,
        clock: Clock = time.perf_counter,
    ) -> TokenFeed:
        """Start tokenizing `cfg.data` in a background thread, holding at most `window` sequences
        (None: all of them); `clock` measures how long readers wait (`waited_s`)."""
        size = cfg.n_seqs if window is None else max(1, min(window, cfg.n_seqs))
        feed = cls(
            np.empty((size, cfg.context), dtype=np.int32), cfg.n_seqs, 0, done=False, clock=clock
        )
        feed._thread = threading.Thread(
            target=feed._fill, args=(cfg, tokenizer, progress), daemon=True, name="compsae-tokenize"
        )
        feed._thread.start()
        return feed

    @property
    def window(self) -> int:
        """Sequences held at once."""
        return len(self._slots)

    @property
    def context(self) -> int:
        return self._slots.shape[1]

    def _fill(self, cfg: HarvestConfig, tokenizer: Any, progress: bool) -> None:
        n = 0
        try:
            bos, eos = special_ids(tokenizer, cfg.model)
            stream = token_sequences(cfg.data, tokenizer, cfg.context, cfg.prepend_bos, bos, eos)
            with tqdm(
                total=self.n_seqs, desc="tokenize", unit="seq", leave=False, disable=not progress
            ) as bar:
                for seq in stream:
                    self._wait_for_room(n)
                    if self._cancel.is_set():
                        break
                    self._slots[n % self.window] = seq
                    n += 1
                    bar.update(1)
                    with self._cond:
                        self.ready = n
                        self._cond.notify_all()
                    if n == self.n_seqs:
                        break
        except BaseException as e:  # noqa: BLE001 - raised in the reading thread
            self.error = e
        finally:
            with self._cond:
                self.ready, self.done = n, True
                self._cond.notify_all()

    def _wait_for_room(self, n: int) -> None:
        """Block the tokenizer until sequence `n` has a slot (sequence n - window was released)."""
        with self._cond:
            self._cond.wait_for(lambda: n < self.released + self.window or self._cancel.is_set())

    def wait_for(self, n: int) -> int:
        """Wait until the first `n` sequences are tokenized; returns how many of them there are
        (fewer than `n` only when the data ran out).  Raises the tokenizing thread's error only
        when it stopped before `n`: the sequences before it are harvested."""
        with self._cond:
            if self.ready < n and not self.done:
                if n > self.released + self.window:
                    raise ValueError(
                        f"sequence {n - 1} is beyond the feed's window (released {self.released}, "
                        f"window {self.window}); release the sequences before it first"
                    )
                t0 = self.clock()
                self.wanted = n
                self._cond.wait_for(lambda: self.ready >= n or self.done)
                self.wanted = 0
                self.waited_s += self.clock() - t0
        if self.ready < n and self.error is not None:
            raise self.error
        return min(n, self.ready)

    def seqs(self, a: int, b: int) -> np.ndarray:
        """Sequences `a .. b` `[b - a, context]`, tokenized and not released (a view of the ring
        where contiguous, else a copy: read it before releasing them)."""
        if not (self.released <= a <= b <= self.ready):
            raise ValueError(
                f"sequences {a}..{b} are not held (released {self.released}, ready {self.ready})"
            )
        lo, n = (
            a % self.window,
            b - a,
        )  # n <= window: the tokenizer never runs a window past `released`
        if lo + n <= self.window:
            return self._slots[lo : lo + n]
        return np.concatenate([self._slots[lo:], self._slots[: lo + n - self.window]])

    def token_rows(self, r0: int, r1: int) -> np.ndarray:
        """Token ids of rows `r0 .. r1` (row = sequence * context + position), as a copy."""
        ctx = self.context
        first = r0 // ctx
        flat = self.seqs(first, -(-r1 // ctx)).reshape(-1)
        return flat[r0 - first * ctx : r1 - first * ctx].copy()

    def release(self, a: int) -> None:
        """The reader is done with the sequences before `a`: the tokenizer may overwrite them."""
        with self._cond:
            if a > self.released:
                self.released = a
                self._cond.notify_all()

    def result(self, source: str, n_tokens: int) -> np.ndarray:
        """Every sequence `[n, context]` once tokenized (a feed that holds them all); one-line
        errors for an empty data set (`source`), a note when it ran out before `n_tokens`."""
        if self.window < self.n_seqs:
            raise ValueError("result() needs a feed that holds every sequence (window None)")
        n = self.wait_for(self.n_seqs)
        self.check_not_empty(source)
        if n < self.n_seqs:
            tqdm.write(
                f"harvest: the data ran out after {n * self.context} of {n_tokens} tokens; storing "
                "those"
            )
        return self._slots[:n]

    def check_not_empty(self, source: str) -> None:
        """Raise the one-line error when the data holds not even one sequence."""
        if self.wait_for(1) == 0:
            raise UserError(
                f"data set {source!r} is empty or shorter than one sequence of {self.context} "
                "tokens; check data.source / data.text_field or lower harvest.context"
            )

    def cancel(self) -> None:
        """Stop tokenizing (the model failed to load, or the harvest ended early)."""
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()


def window_seqs(cfg: HarvestConfig, batch_size: int, shard_rows: int) -> int:
    """Sequences a single-process harvest's feed holds: `WINDOW_TOKENS`, and never fewer than two
    batches plus a shard (a shard being filled keeps its first sequences until it is handed
    over)."""
    floor = 2 * (batch_size + -(-shard_rows // cfg.context) + 1)
    return max(floor, WINDOW_TOKENS // cfg.context)
