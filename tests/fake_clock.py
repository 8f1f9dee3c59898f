"""A clock that moves only when a test says so: verdicts that depend on measured seconds (what
limits a harvest) are then decided by the counts the test sets up, never by the machine's load."""

from __future__ import annotations

import threading


class FakeClock:
    """Callable like `time.perf_counter`; reads the same value from every thread until `advance`."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()  # advanced by one thread while others read it

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass."""
        with self._lock:
            self._now += seconds
