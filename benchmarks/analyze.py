"""Benchmark of the analysis pass: the Dask path against a single-threaded numpy loop over the same
store, and how the Dask path's time grows from N to 4N tokens.

Both run the same per-block statistics (reconstruction sums, latent sums, top contexts, head and
pair statistics of a CompSAE and a TopK SAE); the loop reads chunk after chunk in one thread (one
torch and one BLAS thread: a single-threaded baseline), Dask runs one task per chunk on the
threaded scheduler (one torch and one BLAS thread per task, one task per core).

    .venv/bin/python benchmarks/analyze.py --quick      # < 1 minute
A watchdog (`--budget` seconds) ends a run that stalls with every thread's stack printed, so a
hang shows where it is instead of running on.
Ends with `RESULT dask_vs_numpy=<loop time / dask time>` (goal ≥ 1.5 on 2 cores) and
`RESULT growth_4x=<time(4N) / (4 · time(N))>` (goal: within 20 % of 1).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import tempfile
import time

import numpy as np
import torch

from compsae.analysis.block_stats import BlockSpec
from compsae.analysis.dask_path import (
    BlockPlan,
    acts_array,
    build_graph,
    compute,
    open_store,
    reference_partials,
    torch_threads,
)
from compsae.analysis.reconstructors import SAEReconstructor
from compsae.store import ActivationStore, StoreLayout
from compsae.train.config import make_model_config
from compsae.train.models import build_model

HOOK = "blocks.0.hook_resid_post"


def make_store(url: str, n_rows: int, d: int, chunk_rows: int) -> None:
    rng = np.random.default_rng(0)
    shard_rows = chunk_rows * 8
    st = ActivationStore.create(
        url,
        {HOOK: d},
        n_rows,
        StoreLayout(chunk_rows=chunk_rows, shard_rows=shard_rows),
        {"config_hash": "bench", "context": 128},
        overwrite=True,
    )
    for shard in range(-(-n_rows // shard_rows)):
        lo, hi = shard * shard_rows, min((shard + 1) * shard_rows, n_rows)
        rows = np.arange(lo, hi)
        st.write_shard(
            shard,
            {HOOK: rng.normal(size=(hi - lo, d)).astype(np.float32)},
            tokens=rng.integers(0, 256, hi - lo),
            seq_id=rows // 128,
            pos=rows % 128,
        )
    st.finalize()


CPU_USED: dict[str, list[float]] = {}  # per kind of run: CPU seconds / wall seconds of each run


def timed(fn, kind: str = "") -> tuple[float, object]:
    """(wall seconds, result) of `fn()`; also records the cores it kept busy (process CPU time of
    all threads / wall time): the measure of how much parallelism the machine actually gave."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall = time.perf_counter() - t0
    CPU_USED.setdefault(kind, []).append((time.process_time() - c0) / wall)
    return wall, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    ap.add_argument("--rows", type=int, default=None, help="N (tokens of the small run)")
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--latents", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds before the watchdog dumps every thread's stack and exits (default 120 quick, "
        "1800)",
    )
    args = ap.parse_args()
    faulthandler.dump_traceback_later(
        args.budget or (120 if args.quick else 1800), exit=True, file=sys.stderr
    )
    n = args.rows or (8192 if args.quick else 65536)
    d = args.d or (64 if args.quick else 256)
    n_latents = args.latents or (512 if args.quick else 2048)
    repeats = args.repeats or (
        4 if args.quick else 3
    )  # min of alternating runs: a shared machine's quiet moments
    chunk_rows = 1024
    torch.manual_seed(0)
    recons = [
        SAEReconstructor(
            "compsae",
            "compsae",
            n_latents,
            model=build_model(
                make_model_config(
                    type="compsae", n_latents=n_latents, k=16, d_f=64, d_c=32, n_heads=4
                ),
                d,
            ).eval(),
        ),
        SAEReconstructor(
            "topk",
            "topk",
            n_latents,
            model=build_model(make_model_config(type="topk", n_latents=n_latents, k=16), d).eval(),
        ),
    ]
    spec = BlockSpec(
        top_k_contexts=10,
        tracked={"compsae": np.arange(min(128, n_latents))},
        contexts_for=frozenset({"compsae", "topk"}),
    )
    with tempfile.TemporaryDirectory() as tmp:
        url = os.path.join(tmp, "bench.zarr")
        make_store(url, 4 * n, d, chunk_rows)
        store = open_store(url)

        def plan(rows: int) -> BlockPlan:
            keep = np.zeros(store.n_rows, bool)
            keep[:rows] = True
            return BlockPlan(list(range(-(-rows // chunk_rows))), keep)

        def dask_run(rows: int) -> object:
            p = plan(rows)
            return compute(
                build_graph(acts_array(store, HOOK), store.pos, p, recons, spec),
                None,
                progress=False,
            )

        def loop_run(rows: int) -> object:
            return reference_partials(store, HOOK, store.pos, plan(rows), recons, spec)

        dask_run(chunk_rows)  # warm-up: page cache, torch kernels
        with torch_threads(1):
            loop_run(chunk_rows)
        load_before = os.getloadavg()[0]
        t_loop = t_dask = t_dask4 = float("inf")
        for _ in range(repeats):  # alternating, so a busier moment of the shared machine hits both
            t_loop = min(t_loop, timed(lambda: loop_run(n), "loop")[0])
            t_dask = min(t_dask, timed(lambda: dask_run(n), "dask")[0])
        t_dask4 = min(timed(lambda: dask_run(4 * n), "dask4")[0] for _ in range(repeats))
        a, b = loop_run(n), dask_run(n)
        same = (
            abs(a["compsae"]["rest"].sq_err - b["compsae"]["rest"].sq_err)
            <= 1e-9 * a["compsae"]["rest"].sq_err
        )
        store.close()
    print(
        f"N={n} tokens, d={d}, {n_latents} latents, 2 models, {os.cpu_count()} cpus, torch threads "
        "per task 1"
    )
    print(f"numpy loop (1 thread): {t_loop:.3f} s  ({n / t_loop:,.0f} tokens/s)")
    print(f"dask threaded:         {t_dask:.3f} s  ({n / t_dask:,.0f} tokens/s)")
    print(f"dask at 4N:            {t_dask4:.3f} s  ({4 * n / t_dask4:,.0f} tokens/s)")
    print(f"same numbers: {same}")
    print(
        f"cores kept busy (CPU time / wall time): loop {max(CPU_USED['loop']):.2f}, dask "
        f"{max(CPU_USED['dask']):.2f}, "
        f"dask at 4N {max(CPU_USED['dask4']):.2f}; load average before {load_before:.1f}, after "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus"
    )
    print(f"RESULT dask_cores_busy={max(CPU_USED['dask']):.2f}")
    print(f"RESULT dask_vs_numpy={t_loop / t_dask:.3f}")
    print(f"RESULT growth_4x={t_dask4 / (4 * t_dask):.3f}")


if __name__ == "__main__":
    main()
