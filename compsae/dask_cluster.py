"""Which Dask scheduler a stage computes on: threads, a fresh LocalCluster, or an existing
cluster."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from compsae.errors import UserError

CONNECT_TIMEOUT = "10s"


@contextmanager
def dask_client(
    workers: int = 0,
    scheduler: str | None = None,
    threads_per_worker: int = 1,
    processes: bool = True,
) -> Iterator[Any]:
    """None for the threaded scheduler (`workers=0`, no `scheduler`), else a `distributed.Client`:
    to the cluster at `scheduler` (tcp://host:port), or to a fresh `LocalCluster` of `workers`
    workers, closed on exit (`processes=False` runs the workers as threads)."""
    if scheduler is None and workers == 0:
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            raise UserError(
                f"cannot reach the Dask scheduler at {scheduler} ({type(e).__name__}); "
                "start it or drop --scheduler"
            ) from None
        with client:
            yield client
        return
    if workers < 0:
        raise UserError(f"--workers must be 0 (threads) or more (got {workers})")
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=processes,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
