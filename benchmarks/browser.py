"""Benchmark of the feature browser: the time to build one model's page (contexts shaded, activation
histograms, logit effects) against the baseline of one plain CompSAE forward (as analysis runs it)
over the same number of rows the page encodes (its time per row measured on up to 4096 rows), and
the page size.

    .venv/bin/python benchmarks/browser.py --quick      # < 1 minute (1024 latents, d 128)
    .venv/bin/python benchmarks/browser.py              # the demo's shape: 4096 latents, d 576,
    vocab 49152
Ends with `RESULT browser_s=...`, `RESULT browser_vs_forward=<browser time / forward time>` and
`RESULT page_mb=...`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pandas as pd
import torch

from compsae.analysis.browser import write_browsers
from compsae.analysis.reconstructors import SAEReconstructor
from compsae.store import ActivationStore, StoreLayout
from compsae.train.checkpoint import save_checkpoint
from compsae.train.config import make_model_config
from compsae.train.models import build_model

HOOK = "blocks.6.hook_resid_post"


def make_store(url: str, n_rows: int, d: int) -> ActivationStore:
    rng = np.random.default_rng(0)
    st = ActivationStore.create(
        url,
        {HOOK: d},
        n_rows,
        StoreLayout(chunk_rows=1024, shard_rows=8192),
        {"config_hash": "bench", "context": 128},
        overwrite=True,
    )
    for shard in range(st.n_shards):
        lo, hi = st.shard_range(shard)
        rows = np.arange(lo, hi)
        st.write_shard(
            shard,
            {HOOK: rng.normal(size=(hi - lo, d)).astype(np.float32)},
            tokens=rng.integers(0, 5000, hi - lo),
            seq_id=rows // 128,
            pos=rows % 128,
        )
    st.finalize()
    return ActivationStore.open(url)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_latents, d, vocab, n_rows = (
        (1024, 128, 8192, 32768) if args.quick else (4096, 576, 49152, 65536)
    )
    contexts, window, hist_rows = 5, 12, 8192
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = tempfile.mkdtemp(prefix="bench-browser-")
    store = make_store(f"{tmp}/s.zarr", n_rows, d)
    cfg = make_model_config(type="compsae", n_latents=n_latents, k=32)
    torch.manual_seed(0)
    save_checkpoint(
        f"{tmp}/train/compsae",
        build_model(cfg, d),
        {
            "model": cfg.model_dump(),
            "normalization": {"scale": 1.0},
            "hook": HOOK,
            "step": 1,
            "d_in": d,
            "type": "compsae",
            "split": {"fraction": 0.5, "seed": 0},
        },
    )
    rec = SAEReconstructor.from_checkpoint("compsae", f"{tmp}/train/compsae")
    rng = np.random.default_rng(1)
    # analysis' tables as they look for a dictionary where every latent fired: 20 top contexts each
    latents = pd.DataFrame(
        {
            "model": "compsae",
            "latent": np.arange(n_latents),
            "fire_count": 100,
            "frequency": rng.random(n_latents) / 10,
            "mean_activation": rng.random(n_latents),
            "max_activation": 1 + rng.random(n_latents),
        }
    )
    lat = np.repeat(np.arange(n_latents), 20)
    rows = rng.integers(0, n_rows, len(lat))
    tops = pd.DataFrame(
        {
            "model": "compsae",
            "latent": lat,
            "rank": np.tile(np.arange(20), n_latents),
            "row": rows,
            "activation": rng.random(len(lat)),
            "token_id": store.tokens[rows],
        }
    )
    w_u = rng.normal(size=(d, vocab)).astype(np.float32)
    keep = np.zeros(n_rows, dtype=bool)
    keep[::2] = True

    import compsae.analysis.browser as browser

    browser.load_unembedding = lambda manifest, hook: (
        w_u,
        "",
    )  # the LM is not loaded in a benchmark
    t0 = time.perf_counter()
    pages = write_browsers(
        f"{tmp}/analyze",
        [rec],
        latents,
        tops,
        {},
        store,
        HOOK,
        keep,
        lambda i: f"tok{i}",
        contexts,
        window,
        hist_rows,
    )
    t_browser = time.perf_counter() - t0
    encoded = n_latents * contexts * (window + 1) + hist_rows  # rows the page encodes
    sample = min(encoded, 4096)  # the forward's time per row, measured on a sample, times `encoded`
    x = rng.normal(size=(sample, d)).astype(np.float32)
    t0 = time.perf_counter()
    for lo in range(0, sample, 2048):
        rec(x[lo : lo + 2048])
    t_forward = (time.perf_counter() - t0) * encoded / sample
    size = os.path.getsize(f"{tmp}/analyze/{pages['compsae']}") / 2**20
    print(
        f"{n_latents} latents, d {d}, vocab {vocab}: {encoded} rows encoded; browser "
        f"{t_browser:.1f} s, "
        f"CompSAE forward over as many rows {t_forward:.1f} s (timed on {sample}), page {size:.1f} "
        "MB"
    )
    print(f"RESULT browser_s={t_browser:.2f}")
    print(f"RESULT browser_vs_forward={t_browser / t_forward:.2f}")
    print(f"RESULT page_mb={size:.2f}")


if __name__ == "__main__":
    main()
