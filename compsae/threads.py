"""Scoped torch thread counts.

`torch.set_num_threads` acts on the whole process (threads started later inherit it): a model or a
task that sets it and leaves it set changes the speed, and for reductions the floats, of whatever
the process runs next.  Code that needs a fixed count takes it for the span of its work with
`torch_threads`, which gives the previous count back afterwards."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_LOCK = threading.Lock()
# counts asked for by the scopes now open, in any thread, oldest first; `_SAVED[0]` is the count
# before the first of them opened.  Shared so that scheduler threads running tasks side by side
# (each asking for 1) do not restore the count under one another's feet.
_ACTIVE: list[int] = []
_SAVED: list[int] = []


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch intra-op threads, restoring the previous count afterwards (also on error).

    Scopes nest (the inner count holds inside, the outer one comes back after it) and may be open
    in several threads at once: the count before the first scope returns when the last one closes.
    """
    if n < 1:
        raise ValueError(f"torch_threads needs n >= 1, got {n}")
    with _LOCK:
        if not _ACTIVE:
            _SAVED[:] = [torch.get_num_threads()]
        _ACTIVE.append(n)
        torch.set_num_threads(n)
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE.remove(n)
            torch.set_num_threads(_ACTIVE[-1] if _ACTIVE else _SAVED[0])
