"""`harvest.batch_size: auto`: the choice, its record in the manifest, and a resume that keeps
it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from compsae.harvest import run as harvest_run
from compsae.harvest.batch_size import MAX_BATCH, choose_batch
from compsae.harvest.config import HarvestConfig
from compsae.harvest.run import run_harvest
from compsae.store import ActivationStore


def _cfg(**over: Any) -> HarvestConfig:
    base: dict[str, Any] = dict(
        model="tiny-neox",
        hooks=["blocks.1.hook_resid_post"],
        context=32,
        n_tokens=2048,
        batch_size="auto",
        chunk_rows=128,
        shard_rows=512,
        data={"source": "synthetic:mixed", "seed": 3},
        device="cpu",
    )
    base.update(over)
    return HarvestConfig(**base)


def test_choose_batch() -> None:
    gib = 1 << 30
    assert (
        choose_batch(10 * gib, gib, 1000) == 4
    )  # half of 10 GiB holds 5 sequences: 4, a power of two
    assert choose_batch(80 * gib, 1e6, 10**6) == MAX_BATCH
    assert choose_batch(80 * gib, 1e6, 100) == 128  # no larger than the data needs
    assert choose_batch(gib, 4 * gib, 100) == 1  # never 0


def test_config_accepts_auto_or_a_positive_int() -> None:
    assert _cfg().batch_size == "auto" and _cfg(batch_size=8).batch_size == 8
    for bad in (0, "big"):
        with pytest.raises(ValidationError):
            _cfg(batch_size=bad)


def test_auto_is_recorded_and_kept_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    choices = iter([4, 16])  # what `auto` would pick in the first run, then on the rerun
    monkeypatch.setattr(harvest_run, "auto_batch_size", lambda *a, **k: next(choices))

    def die(shard: int) -> None:
        if shard == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_harvest(_cfg(), str(tmp_path / "a"), on_shard_written=die)
    out = run_harvest(_cfg(), str(tmp_path / "a"))
    resumed = ActivationStore.open(out["store"])
    assert resumed.manifest["harvest"]["batch_size"] == 4  # the first run's, not the rerun's 16
    fixed = ActivationStore.open(run_harvest(_cfg(batch_size=4), str(tmp_path / "b"))["store"])
    hook = "blocks.1.hook_resid_post"
    np.testing.assert_array_equal(resumed.zarr_array(hook)[:], fixed.zarr_array(hook)[:])


def test_auto_on_the_cpu_is_32(tmp_path: Path) -> None:
    out = run_harvest(_cfg(), str(tmp_path))  # 64 sequences
    assert ActivationStore.open(out["store"]).manifest["harvest"]["batch_size"] == 32


def test_auto_is_at_most_one_shard_of_sequences() -> None:
    from compsae.harvest.batch_size import shard_cap

    assert shard_cap(16_384, 128) == 128 and shard_cap(65_536, 2048) == 32
    assert (
        shard_cap(1024, 128) == 128
    )  # small shards do not make the batch smaller than 16,384 tokens
    assert shard_cap(16_384, 32_768) == 1
    gib = 1 << 30
    assert (
        choose_batch(80 * gib, 1e6, 10**6, max_seqs=128) == 128
    )  # 16,384-row shards of 128 tokens
    assert (
        choose_batch(80 * gib, 1e6, 10**6, max_seqs=100) == 64
    )  # a power of two, no more than one shard
    assert choose_batch(80 * gib, 1e6, 10**6, max_seqs=0) == 1


def test_the_writer_queue_holds_two_batches_of_shards() -> None:
    from compsae.harvest.shards import queue_depth

    assert queue_depth(4096, 16_384) == 4  # a batch within one shard can still end two
    assert (
        queue_depth(131_072, 16_384) == 18
    )  # 1,024 sequences of 128: 8 shards a batch, 9 when straddling
