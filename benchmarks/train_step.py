"""Eager CPU cost of one training step (forward, backward, Adam): TopK with the sparse and the
dense decoder, and CompSAE (pair and default composer) against TopK.

    python benchmarks/train_step.py [--latents 4096] [--steps 6] [--threads 1]
Prints `RESULT topk_dense_vs_sparse=..`, `RESULT compsae_pair_vs_topk=..`, `RESULT
compsae_vs_topk=..` (step-time ratios, median of the steps after the first)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from compsae.train.config import MODEL_CONFIGS, make_model_config
from compsae.train.models import build_model

D, BATCH, K = 512, 512, 32


def _cfg(kind: str, **fields: object) -> object:
    own = MODEL_CONFIGS[kind].model_fields
    return make_model_config(type=kind, **{k: v for k, v in fields.items() if k in own})


def step_seconds(kind: str, sparse: bool, n: int, steps: int, **over: object) -> float:
    """Median seconds of one eager training step after a warm-up step."""
    torch.manual_seed(0)
    model = build_model(_cfg(kind, n_latents=n, k=K, aux_k=256, **over), D)
    model.sparse_decoder = sparse
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.randn(BATCH, D)
    dead = torch.zeros(n, dtype=torch.bool)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model.compute_loss(x, dead)[0]["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    """Run the four step timings and print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--latents", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, s = args.latents, args.steps
    topk = step_seconds("topk", True, n, s)
    dense = step_seconds("topk", False, n, s)
    pair = step_seconds("compsae", True, n, s, composer="pair")
    comp = step_seconds("compsae", True, n, s)
    print(
        f"step ms: topk_sparse={topk * 1e3:.1f} topk_dense={dense * 1e3:.1f} "
        f"compsae_pair={pair * 1e3:.1f} compsae={comp * 1e3:.1f}"
    )
    print(f"RESULT topk_dense_vs_sparse={dense / topk:.3f}")
    print(f"RESULT compsae_pair_vs_topk={pair / topk:.3f}")
    print(f"RESULT compsae_vs_topk={comp / topk:.3f}")


if __name__ == "__main__":
    main()
