"""Scale-out: harvest tokens/s with 1 and 2 Dask workers, and store reads from S3 against local
disk.

(a) A `LocalCluster` of single-threaded worker processes, first 1 worker, then scaled to 2; the
    workers import the harvest code before each timed run.  The same harvest (tiny-neox, fresh store
    each time) is run through `run_harvest(scheduler=...)` on 1, then on 2 workers.  tokens/s counts
    the whole harvest as a user sees it (client model load, tokenization, tasks, finalize).  The
    single-process harvest (no Dask) is printed for reference (not with --quick).
(b) The 2-worker store is uploaded to an S3-compatible server on 127.0.0.1 (moto, in its own
    process so it does not share this one's GIL), then every chunk of the hook is read with
    `ActivationStore.read_chunk` from S3 and from the local copy (fresh store object each pass, so
    no shard cache is reused).  Best of `--repeats` passes each.

Printed, not asserted; the machine may be shared, so compare the ratios, not the absolute rates.

    python benchmarks/scale.py --quick
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from compsae.harvest.config import HarvestConfig
from compsae.harvest.run import run_harvest
from compsae.store import ActivationStore

HOOK = "blocks.3.hook_resid_post"


def _warm() -> None:
    """Run on each worker: import the harvest code once, outside the timed runs."""
    import compsae.harvest.parallel  # noqa: F401


def timed_harvest(cfg: HarvestConfig, out_dir: str, **kw: Any) -> tuple[float, str]:
    """Seconds for one whole harvest into a fresh store; returns (seconds, store url)."""
    t0 = time.perf_counter()
    out = run_harvest(cfg, out_dir, force=True, **kw)
    return time.perf_counter() - t0, out["store"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_s3_server() -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server in a child process on a free loopback port; s3fs pointed at it."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from moto.server import main; main()",
            "-H",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    return proc, endpoint


def read_all_chunks(url: str) -> tuple[float, int]:
    """Seconds to read every chunk of HOOK through `read_chunk` (checksums checked); rows read."""
    store = ActivationStore.open(url)
    t0 = time.perf_counter()
    rows = sum(store.read_chunk(HOOK, c).shape[0] for c in range(store.n_chunks))
    seconds = time.perf_counter() - t0
    store.close()
    return seconds, rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small run, under a minute")
    ap.add_argument("--tokens", type=int, help="tokens per harvest")
    ap.add_argument("--repeats", type=int, default=3, help="read passes per source (best counts)")
    args = ap.parse_args()

    n_tokens = args.tokens or (12_288 if args.quick else 131_072)
    cfg = HarvestConfig(
        model="tiny-neox",
        hooks=[HOOK],
        context=128,
        n_tokens=n_tokens,
        batch_size=16,
        chunk_rows=1024,
        shard_rows=2048 if args.quick else 16_384,
        device="cpu",
        data={"source": "synthetic:mixed", "seed": 0},
    )
    tmp = tempfile.mkdtemp(prefix="compsae-scale-")

    single_s = None if args.quick else timed_harvest(cfg, f"{tmp}/single")[0]
    from distributed import Client, LocalCluster

    # one cluster grown from 1 to 2 workers: a second cluster would pay every worker's start again
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.run(_warm)
        one_s, _ = timed_harvest(cfg, f"{tmp}/one", scheduler=cluster.scheduler_address)
        cluster.scale(2)
        client.wait_for_workers(2)
        client.run(_warm)
        two_s, two_url = timed_harvest(cfg, f"{tmp}/two", scheduler=cluster.scheduler_address)
    rows = ActivationStore.open(two_url).n_rows
    print(f"harvest {rows} tokens (tiny-neox, {HOOK}), {os.cpu_count()} cores:")
    if single_s is not None:
        print(f"  no Dask          {rows / single_s:9.0f} tok/s")
    print(f"  1 Dask worker    {rows / one_s:9.0f} tok/s")
    print(f"  2 Dask workers   {rows / two_s:9.0f} tok/s")

    server, endpoint = start_s3_server()
    try:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("compsae-bench")
        fs.put(two_url, "compsae-bench/store.zarr", recursive=True)
        s3_url = "s3://compsae-bench/store.zarr"
        local = min(read_all_chunks(two_url)[0] for _ in range(args.repeats))
        remote = min(read_all_chunks(s3_url)[0] for _ in range(args.repeats))
    finally:
        server.kill()
        server.wait()
    mb = rows * cfg_width(two_url) * 2 / 1e6
    print(
        f"read every chunk of {HOOK} ({mb:.1f} MB float16) with read_chunk, best of {args.repeats}:"
    )
    print(f"  local disk       {rows / local:12.0f} rows/s  ({mb / local:8.1f} MB/s)")
    print(f"  S3 ({endpoint})  {rows / remote:12.0f} rows/s  ({mb / remote:8.1f} MB/s)")
    print(f"RESULT harvest_2workers_vs_1={one_s / two_s:.3f}")
    print(f"RESULT s3_vs_local_read={local / remote:.4f}")


def cfg_width(url: str) -> int:
    return ActivationStore.open(url).d_model(HOOK)


if __name__ == "__main__":
    main()
