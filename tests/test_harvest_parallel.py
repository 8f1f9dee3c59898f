"""Parallel harvest on Dask: byte-identical to one process, resumes holes, holds the lock, wired to
the CLI."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import zarr
from test_token_feed import _tokens_after_store_creation

from compsae.errors import UserError
from compsae.harvest.config import HarvestConfig
from compsae.harvest.parallel import harvest_client, harvest_range, shard_ranges
from compsae.harvest.run import run_harvest
from compsae.store import ActivationStore, writer_lock


def small_cfg(**over: Any) -> HarvestConfig:
    """2,304 rows in 5 shards of 512 (the last partial); batches of 3 sequences (96 rows) straddle
    shards."""
    base: dict[str, Any] = dict(
        model="tiny-neox",
        hooks=["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"],
        context=32,
        n_tokens=2300,
        batch_size=3,
        chunk_rows=128,
        shard_rows=512,
        data={"source": "synthetic:mixed", "seed": 3},
        device="cpu",
    )
    base.update(over)
    return HarvestConfig(**base)


def all_arrays(url: str) -> dict[str, bytes]:
    """Every array of the store's Zarr group (activations, columns, progress, statistics) as raw
    bytes."""
    group = zarr.open_group(url, mode="r")
    out: dict[str, bytes] = {}
    with warnings.catch_warnings():  # the lock file is no Zarr node
        warnings.simplefilter("ignore")
        members = list(group.members(max_depth=None))
    for path, arr in members:
        if isinstance(arr, zarr.Array):
            data = arr[:]
            out[path] = data.dtype.str.encode() + str(data.shape).encode() + data.tobytes()
    return out


def assert_same_store(a_url: str, b_url: str) -> None:
    a, b = all_arrays(a_url), all_arrays(b_url)
    # 2 hooks x (acts, stats, bound checksums) + 3 columns + 3 progress
    assert sorted(a) == sorted(b) and len(a) == 12
    for path in a:
        if "_crc/" not in path and not path.endswith("side_crc"):  # bound to each store's own id
            assert a[path] == b[path], f"{path} differs"
    ma, mb = (dict(ActivationStore.open(u).manifest) for u in (a_url, b_url))
    for key in ("created_at", "store_id", "integrity"):
        ma.pop(key), mb.pop(key)
    assert ma == mb
    assert ActivationStore.open(a_url).verify() == [] and ActivationStore.open(b_url).verify() == []


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_harvest(small_cfg(), str(tmp_path_factory.mktemp("single")))


@pytest.fixture(scope="module")
def client() -> Any:
    """Two thread workers (no process start-up) shared by the tests of this module."""
    with harvest_client(workers=2, processes=False) as c:
        yield c


def test_shard_ranges_cover_missing_shards_in_consecutive_runs() -> None:
    missing = [0, 1, 2, 3, 4, 5, 6, 9, 10, 12]
    ranges = shard_ranges(missing, 4)
    assert sorted(s for r in ranges for s in r) == missing
    assert all(len(r) <= 3 for r in ranges)  # ceil(10 / 4)
    assert [(r.start, r.stop) for r in ranges] == [(0, 3), (3, 6), (6, 7), (9, 11), (12, 13)]
    assert shard_ranges([], 4) == [] and shard_ranges([7], 8) == [range(7, 8)]


def test_two_workers_give_the_single_process_store(
    tmp_path: Path, single: dict[str, Any], monkeypatch: pytest.MonkeyPatch, client: Any
) -> None:
    monkeypatch.setattr(
        "compsae.harvest.parallel.TASKS_PER_WORKER", 2
    )  # 4 ranges for 5 shards: cut batches
    out = run_harvest(small_cfg(), str(tmp_path), scheduler=client.scheduler.address)
    st = ActivationStore.open(out["store"])
    assert st.complete and st.verify() == []
    assert_same_store(out["store"], single["store"])
    assert out["digest"] == single["digest"]


_TASKS: list[tuple[range, int]] = []  # (shards, sequences handed over) of each task
_REAL_RANGE = harvest_range


def _recorded_range(cfg: HarvestConfig, url: str, seqs: Any, first_seq: int, *rest: Any) -> int:
    """harvest_range, recording its task (module level: Dask pickles it by reference, so the thread
    workers append to this module's list)."""
    _TASKS.append((rest[-1], len(seqs)))
    return _REAL_RANGE(cfg, url, seqs, first_seq, *rest)


@pytest.mark.parametrize("ran_out", [False, True])
def test_a_parallel_harvest_holding_a_window_of_tokens_gives_the_single_process_store(
    tmp_path: Path, client: Any, monkeypatch: pytest.MonkeyPatch, ran_out: bool
) -> None:
    """The client's feed holds 40 sequences (two batches plus a shard), fewer than the harvest's;
    tasks, capped at the 2 shards the window holds, go out as it fills, each with a copy of its
    sequences.  Also when the data runs out part-way: the store shrinks before the last task."""
    from compsae.harvest import parallel, token_feed

    cfg = (
        small_cfg(n_tokens=10_000, data={"source": "synthetic:mixed", "seed": 3, "max_docs": 30})
        if ran_out
        else small_cfg()
    )
    one = run_harvest(cfg, str(tmp_path / "one"))
    monkeypatch.setattr(token_feed, "WINDOW_TOKENS", 0)
    monkeypatch.setattr(parallel, "TASKS_PER_WORKER", 1)  # ranges of 3 shards before the cap
    assert token_feed.window_seqs(cfg, cfg.batch_size, cfg.shard_rows) == 40 < cfg.n_seqs
    _TASKS.clear()
    monkeypatch.setattr(parallel, "harvest_range", _recorded_range)
    seen = _tokens_after_store_creation(
        monkeypatch
    )  # the store is laid out before the data is known to end
    out = run_harvest(cfg, str(tmp_path / "two"), scheduler=client.scheduler.address)
    tasks = list(_TASKS)
    assert_same_store(out["store"], one["store"])
    st = ActivationStore.open(out["store"])
    assert st.n_rows % cfg.shard_rows  # a partial last shard
    assert (
        seen["shrinks"] == ([st.n_rows] if ran_out else [])
        and (st.n_rows < cfg.n_tokens) == ran_out
    )
    assert sorted(s for r, _ in tasks for s in r) == list(range(st.n_shards))
    assert all(len(r) <= 2 and n <= 40 for r, n in tasks) and any(len(r) == 2 for r, _ in tasks)


def test_parallel_resume_fills_holes_only(
    tmp_path: Path, single: dict[str, Any], client: Any
) -> None:
    out = run_harvest(small_cfg(), str(tmp_path))
    group = zarr.open_group(out["store"], mode="r+")
    for shard in (1, 3):  # as if two tasks of a parallel run died: not done, data zeroed
        group["progress/shard_done"][shard] = 0
        for hook in small_cfg().hooks:
            group[f"acts/{hook}"][shard * 512 : (shard + 1) * 512] = 0
    meta = dict(group.attrs["manifest"])
    group.attrs["manifest"] = {**meta, "complete": False}
    written: list[int] = []
    run_harvest(
        small_cfg(),
        str(tmp_path),
        scheduler=client.scheduler.address,
        on_shard_written=written.append,
    )
    assert sorted(written) == [1, 3]
    assert ActivationStore.open(out["store"]).verify() == []
    assert_same_store(out["store"], single["store"])


def test_client_holds_the_writer_lock_while_workers_write(tmp_path: Path, client: Any) -> None:
    refused: list[str] = []

    def try_second_writer(shard: int) -> None:
        with (
            pytest.raises(UserError, match="another harvest") as info,
            writer_lock(str(tmp_path / "store.zarr"), "harvest"),
        ):
            pass
        refused.append(str(info.value))

    out = run_harvest(
        small_cfg(n_tokens=1024),
        str(tmp_path),
        scheduler=client.scheduler.address,
        on_shard_written=try_second_writer,
    )
    assert len(refused) == 2 and ActivationStore.open(out["store"]).complete


def test_local_cluster_of_thread_workers(tmp_path: Path, single: dict[str, Any]) -> None:
    out = run_harvest(small_cfg(), str(tmp_path), workers=2, processes=False)
    assert_same_store(out["store"], single["store"])


def test_error_in_a_worker_reaches_the_client(
    tmp_path: Path, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unwritable(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")  # errno.ENOSPC

    monkeypatch.setattr(ActivationStore, "write_shard", unwritable)
    with pytest.raises(UserError, match="disk full while writing shard"):
        run_harvest(small_cfg(n_tokens=1024), str(tmp_path), scheduler=client.scheduler.address)
    assert not ActivationStore.open(str(tmp_path / "store.zarr")).complete


def test_unreachable_scheduler_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("compsae.dask_cluster.CONNECT_TIMEOUT", "1s")
    with (
        pytest.raises(
            UserError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"
        ) as info,
        harvest_client(scheduler="tcp://127.0.0.1:9"),
    ):
        pass
    assert "\n" not in str(info.value)


def test_cli_workers_reach_run_harvest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compsae import cli

    seen: dict[str, Any] = {}

    def fake(cfg: HarvestConfig, out_dir: str, force: bool = False, **kw: Any) -> dict[str, Any]:
        seen.update(kw)
        return {
            "store": f"{out_dir}/store.zarr",
            "n_rows": 0,
            "hooks": {},
            "dtype": "float16",
            "digest": "x",
        }

    monkeypatch.setattr(
        "compsae.harvest.stage.run_harvest", fake
    )  # where the harvest stage calls it
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"runs_root: {tmp_path}/runs\npipelines:\n  t:\n    harvest: {{model: tiny-neox, n_tokens: "
        "64}\n"
    )
    assert cli.main(["harvest", "-p", "t", "-c", str(cfg), "--workers", "3"]) == 0
    assert seen == {"workers": 3, "scheduler": None}
    assert (
        cli.main(["harvest", "-p", "t", "-c", str(cfg), "--force", "--scheduler", "tcp://h:8786"])
        == 0
    )
    assert seen == {"workers": None, "scheduler": "tcp://h:8786"}
