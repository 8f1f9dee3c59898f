"""`TokenFeed`: the harvest's token sequences, tokenized by a background thread while the model
loads and the forward passes run.

A harvest used to wait for every token before its first forward pass (about 1 s per million
tokens on 2 cores: as long as the loop itself on a GPU that harvests ~1M tokens/s).  The feed
fills one preallocated `[n_seqs, context]` array in order; a reader asks for the first `n`
sequences and waits only until they are there.  The same generator fills it whether read early
or late, so the sequences, and the batches made of them, are the ones `tokenize_all` gives.
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
from compsae.harvest.models import special_ids


class TokenFeed:
    """Token sequences `array: [n_seqs, context]` int32, of which the first `ready` are filled.

    `wait_for(n)` blocks until `n` sequences are there or the data has run out (then fewer);
    `result()` waits for all of them.  An error in the tokenizing thread is raised by both."""

    def __init__(self, array: np.ndarray, ready: int, done: bool) -> None:
        self.array = array
        self.ready = ready
        self.done = done
        self.error: BaseException | None = None
        self.waited_s = 0.0  # seconds readers spent waiting for sequences not yet tokenized
        self._cond = threading.Condition()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def of(cls, tokens: np.ndarray) -> TokenFeed:
        """A feed of sequences already tokenized (`tokens: [n, context]`)."""
        return cls(tokens, len(tokens), done=True)

    @classmethod
    def start(cls, cfg: HarvestConfig, tokenizer: Any, progress: bool = False) -> TokenFeed:
        """Start tokenizing `cfg.data` in a background thread."""
        feed = cls(np.empty((cfg.n_seqs, cfg.context), dtype=np.int32), 0, done=False)
        feed._thread = threading.Thread(target=feed._fill, args=(cfg, tokenizer, progress), daemon=True,
                                        name="compsae-tokenize")
        feed._thread.start()
        return feed

    @property
    def n_seqs(self) -> int:
        """Sequences asked (the array's length); fewer are stored when the data runs out."""
        return len(self.array)

    def _fill(self, cfg: HarvestConfig, tokenizer: Any, progress: bool) -> None:
        n = 0
        try:
            bos, eos = special_ids(tokenizer, cfg.model)
            stream = token_sequences(cfg.data, tokenizer, cfg.context, cfg.prepend_bos, bos, eos)
            with tqdm(total=self.n_seqs, desc="tokenize", unit="seq", leave=False, disable=not progress) as bar:
                for seq in stream:
                    if self._cancel.is_set():
                        break
                    self.array[n] = seq
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

    def wait_for(self, n: int) -> int:
        """Wait until the first `n` sequences are tokenized; returns how many of them there are
        (fewer than `n` only when the data ran out).  Raises the tokenizing thread's error only
        when it stopped before `n`: the sequences before it are harvested."""
        with self._cond:
            if self.ready < n and not self.done:
                t0 = time.perf_counter()
                self._cond.wait_for(lambda: self.ready >= n or self.done)
                self.waited_s += time.perf_counter() - t0
        if self.ready < n and self.error is not None:
            raise self.error
        return min(n, self.ready)

    def result(self, source: str, n_tokens: int) -> np.ndarray:
        """Every sequence `[n, context]` once tokenized; one-line errors for an empty data set
        (`source`), a note when it ran out before `n_tokens`."""
        n = self.wait_for(self.n_seqs)
        self.check_not_empty(source)
        if n < self.n_seqs:
            tqdm.write(f"harvest: the data ran out after {n * self.array.shape[1]} of {n_tokens} tokens; "
                       "storing those")
        return self.array[:n]

    def check_not_empty(self, source: str) -> None:
        """Raise the one-line error when the data holds not even one sequence."""
        if self.wait_for(1) == 0:
            raise UserError(f"data set {source!r} is empty or shorter than one sequence of {self.array.shape[1]} "
                            "tokens; check data.source / data.text_field or lower harvest.context")

    def cancel(self) -> None:
        """Stop tokenizing (the model failed to load, or the harvest ended early)."""
        self._cancel.set()
