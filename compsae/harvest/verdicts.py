"""What limits a harvest, told from the seconds it measured: the shard writers (the disk, or too few
`harvest.writer_threads`) or the tokenizer.

Every second behind a verdict is read from a `Clock` handed down through the harvest
(`run_harvest(clock=...)`, `harvest_shards`, `ShardWriter`, `TokenFeed`), `time.perf_counter`
unless told otherwise: a test drives the verdicts with a clock it advances itself, so what they say
does not hang on how fast the machine happens to be (on a loaded machine a test that slept to make
the writers slow got no verdict).
"""

from __future__ import annotations

from collections.abc import Callable

Clock = Callable[[], float]
"""Seconds since an arbitrary origin, never going back (`time.perf_counter`'s contract)."""

WRITERS_BUSY_SHARE = 0.8  # the writers wrote this share of the time or more: they set the pace
TOKENIZER_WAIT_SHARE = 0.1  # the loop waited for tokens this share of the time or more
MIN_VERDICT_S = 1.0  # a shorter harvest says nothing: start-up noise outweighs the shares


def writers_busy_share(busy_s: float, threads: int, total_s: float) -> float:
    """The share of the writer threads' time spent writing: `busy_s` summed over `threads` threads
    during a harvest loop of `total_s` seconds (0 for an empty loop)."""
    return busy_s / (threads * total_s) if total_s > 0 else 0.0


def writers_verdict(busy_share: float, total_s: float, threads: int) -> str | None:
    """The line a harvest prints when its shard writers held it up (None when they did not)."""
    if busy_share <= WRITERS_BUSY_SHARE or total_s <= MIN_VERDICT_S:
        return None
    return (
        f"harvest: the shard writers were busy {busy_share:.0%} of the time: the disk or "
        f"harvest.writer_threads ({threads}) limits this harvest"
    )


def tokenizer_verdict(waited_s: float, total_s: float) -> str | None:
    """The line a harvest prints when it spent `waited_s` of its `total_s` seconds waiting for the
    tokenizer (None when that share is small or the harvest short)."""
    if waited_s <= TOKENIZER_WAIT_SHARE * total_s or total_s <= MIN_VERDICT_S:
        return None
    return (
        f"harvest: {waited_s:.1f} s of it waiting for the tokenizer: tokenizing (one thread) "
        "limits this harvest"
    )
