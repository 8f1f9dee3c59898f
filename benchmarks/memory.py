"""Peak resident memory of harvest, train and analyze at N and 4N tokens: streaming stages must stay
flat (ratio <= 1.1).

Each stage runs as its own `compsae` process (the `tiny` pipeline's shape: tiny-neox, synthetic
text, small CompSAE / TopK / ReLU models), first over N tokens, then over 4N; its peak resident
set is the child's own `ru_maxrss`, read with `os.wait4` (so neither this process nor the other
stages count).  Training is one epoch of the harvested tokens; analyze evaluates every held-out
row and fits its baselines on a share of the store that grows with it, so every stage's work grows
4x with the tokens.

    python benchmarks/memory.py --quick        # N = 16,384 tokens
    python benchmarks/memory.py                # N = 65,536 tokens

Ends with `RESULT rss_growth_4x_<stage>=<peak RSS at 4N / peak RSS at N>` for harvest, train and
analyze, and each peak in MB.

Those runs are small: at N = 65,536 a stage's fixed cost (torch, the model) hides anything the
stage keeps per row.  So the training loader is also measured on its own over a store with many
rows of a narrow hook (4 wide, M and 4M rows; M = 1M, --quick 256k): the peak RSS of a process
that opens it and takes one batch, `RESULT rss_growth_4x_loader=<ratio>` and
`RESULT loader_bytes_per_row=<(peak at 4M - peak at M) / 3M>` (what it keeps per row of the store,
however wide the hook); and the same for what analyze draws before its Dask pass (the held-out
split, the capped evaluation plan, the positions of its rows): `RESULT analyze_plan_bytes_per_row`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

STAGES = ("harvest", "train", "analyze")


def pipeline(root: Path, tokens: int) -> dict:
    """The `tiny` pipeline's shape, sized so every stage's work is proportional to `tokens`."""
    hook = "blocks.1.hook_resid_post"
    small = {"n_latents": 256, "k": 8}
    return {
        "runs_root": str(root / "runs"),
        "pipelines": {
            "mem": {
                "harvest": {
                    "model": "tiny-neox",
                    "hooks": [hook],
                    "data": {"source": "synthetic:mixed", "seed": 0},
                    "context": 32,
                    "n_tokens": tokens,
                    "batch_size": 16,
                    "chunk_rows": 256,
                    "shard_rows": 2048,
                },
                "train": {
                    "hook": hook,
                    "tokens": tokens,
                    "batch_size": 256,
                    "lr": 1e-3,
                    "log_every": 10,
                    "checkpoint_every": 10_000,
                    "models": {
                        "compsae": {"type": "compsae", "d_f": 32, "d_c": 16, "n_heads": 2, **small},
                        "topk": {"type": "topk", **small},
                        "relu": {"type": "relu", "n_latents": 256},
                    },
                },
                "analyze": {
                    "max_heldout_tokens": tokens,
                    "baseline_fit_tokens": max(1024, tokens // 8),
                    "nmf_components": 32,
                    "pair_latents": 64,
                    "ce_sequences": 4,
                    "progress": False,
                },
            }
        },
    }


def peak_rss_mb(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(peak RSS in MB, wall seconds, exit code) of one child process."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nothing blocks while the child runs
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        if rc != 0:
            err.seek(0)
            print(err.read().decode(errors="replace")[-2000:], file=sys.stderr)
    return usage.ru_maxrss / 1024, wall, rc  # ru_maxrss: KB on Linux


LOADER_CHILD = """
import sys
from compsae.store.loader import BatchLoader
loader = BatchLoader(sys.argv[1], "h", batch_size=512, split="train", epochs=1)
next(iter(loader))
"""


PLAN_CHILD = """
import sys
import numpy as np
from compsae.analysis.dask_path import plan_blocks
from compsae.store import ActivationStore
from compsae.store.split import HeldOutSplit
store = ActivationStore.open(sys.argv[1])
plan = plan_blocks(HeldOutSplit().store_mask(store), store.chunk_rows, 65_536)
rows = np.flatnonzero(plan.keep)
rows = rows[store.column_view("pos")[rows] > 0]
"""


def narrow_store(url: str, n_rows: int) -> None:
    """A store of `n_rows` rows of one 4-wide hook, 128-token sequences, written shard by shard."""
    import numpy as np

    from compsae.store import ActivationStore, StoreLayout

    layout = StoreLayout(chunk_rows=1024, shard_rows=16_384)
    store = ActivationStore.create(url, {"h": 4}, n_rows, layout, {"config_hash": "memory-bench"})
    rng = np.random.default_rng(0)
    for shard in range(store.n_shards):
        lo, hi = store.shard_range(shard)
        rows = np.arange(lo, hi)
        store.write_shard(
            shard,
            {"h": rng.normal(size=(hi - lo, 4)).astype(np.float32)},
            tokens=rows % 50_000,
            seq_id=rows // 128,
            pos=rows % 128,
        )
    store.finalize()


def per_row_rss(tmp: str, m: int, env: dict[str, str]) -> dict[str, dict[int, float]]:
    """Peak RSS (MB) of a process that opens the training loader ("loader"), and of one that draws
    analyze's split and plan ("plan"), over narrow stores of M and 4M rows."""
    peaks: dict[str, dict[int, float]] = {"loader": {}, "plan": {}}
    for rows in (m, 4 * m):
        url = f"{tmp}/narrow{rows}.zarr"
        narrow_store(url, rows)
        for what, child in (("loader", LOADER_CHILD), ("plan", PLAN_CHILD)):
            mb, wall, rc = peak_rss_mb([sys.executable, "-c", child, url], env)
            status = "" if rc == 0 else f"  FAILED (exit {rc})"
            print(
                f"{what:<8} {rows:>9,} rows:   peak RSS {mb:7.1f} MB, {wall:5.1f} s{status}",
                flush=True,
            )
            if rc == 0:
                peaks[what][rows] = mb
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="N = 16,384 tokens")
    ap.add_argument("--tokens", type=int, help="N (default 65,536; --quick 16,384)")
    ap.add_argument(
        "--loader-rows",
        type=int,
        help="M for the loader alone (default 1M; --quick 256k; 0 skips it)",
    )
    args = ap.parse_args()
    n = args.tokens or (16_384 if args.quick else 65_536)
    m = args.loader_rows if args.loader_rows is not None else (262_144 if args.quick else 1_048_576)
    root_dir = str(Path(__file__).resolve().parents[1])
    env = dict(
        os.environ,
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (root_dir, os.environ.get("PYTHONPATH", "")) if p),
    )
    peaks: dict[str, dict[int, float]] = {s: {} for s in STAGES}
    with tempfile.TemporaryDirectory() as tmp:
        narrow = per_row_rss(tmp, m, env) if m else {"loader": {}, "plan": {}}
        for tokens in (n, 4 * n):
            root = Path(tmp) / f"n{tokens}"
            root.mkdir()
            cfg = root / "pipelines.yaml"
            cfg.write_text(yaml.safe_dump(pipeline(root, tokens)))
            for stage in STAGES:
                mb, wall, rc = peak_rss_mb(
                    [sys.executable, "-m", "compsae.cli", stage, "-c", str(cfg), "-p", "mem"], env
                )
                status = "" if rc == 0 else f"  FAILED (exit {rc})"
                print(
                    f"{stage:<8} {tokens:>9,} tokens: peak RSS {mb:7.1f} MB, {wall:5.1f} s{status}",
                    flush=True,
                )
                if rc == 0:
                    peaks[stage][tokens] = mb
    for stage in STAGES:
        if len(peaks[stage]) == 2:
            print(f"RESULT rss_growth_4x_{stage}={peaks[stage][4 * n] / peaks[stage][n]:.3f}")
            print(f"RESULT rss_peak_mb_{stage}_4n={peaks[stage][4 * n]:.0f}")
    loader, plan = narrow["loader"], narrow["plan"]
    if len(loader) == 2:
        print(f"RESULT rss_growth_4x_loader={loader[4 * m] / loader[m]:.3f}")
        print(f"RESULT loader_bytes_per_row={(loader[4 * m] - loader[m]) * 2**20 / (3 * m):.2f}")
    if len(plan) == 2:
        print(f"RESULT analyze_plan_bytes_per_row={(plan[4 * m] - plan[m]) * 2**20 / (3 * m):.2f}")


if __name__ == "__main__":
    main()
