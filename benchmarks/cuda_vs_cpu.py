"""Does training on CUDA give the same FVU curve shape as on the CPU?

Trains TopK and CompSAE on the same synthetic batches (known directions plus noise) once on each
device with the real Trainer, and compares the logged FVU curves: Pearson correlation of the two
curves and the ratio of final FVUs.  Ends with `RESULT fvu_curve_corr_<model>=` and
`RESULT fvu_final_cuda_vs_cpu_<model>=`.  Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compsae.train.config import TrainConfig, make_model_config
from compsae.train.models import build_model
from compsae.train.records import CheckpointMeta
from compsae.train.trainer import Trainer


def synthetic_batches(
    n_batches: int, batch: int, d: int, n_true: int, seed: int
) -> list[torch.Tensor]:
    """Sparse combinations of `n_true` fixed unit directions plus noise: the same on every
    device."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=1)
    out = []
    for _ in range(n_batches):
        mask = (torch.rand(batch, n_true, generator=g) < 8 / n_true).float()
        coef = mask * torch.rand(batch, n_true, generator=g) * 3
        out.append(coef @ dirs + 0.01 * torch.randn(batch, d, generator=g))
    return out


def fvu_curve(model_cfg: Any, device: str, batches: list[torch.Tensor], seed: int) -> list[float]:
    cfg = TrainConfig(
        lr=1e-3,
        batch_size=batches[0].shape[0],
        tokens=len(batches) * batches[0].shape[0],
        log_every=5,
        checkpoint_every=10_000,
        device=device,
        seed=seed,
        normalize=False,
    )
    torch.manual_seed(seed)
    model = build_model(model_cfg, batches[0].shape[1])
    model.init_b_dec(batches[0])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model,
            model_cfg,
            cfg,
            tmp,
            CheckpointMeta.start(model_cfg, batches[0].shape[1]),
            progress=False,
        )
        trainer.fit(iter(batches))
        lines = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return [float(x["fvu"]) for x in lines]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument(
        "--devices", default="cpu,cuda", help="the two devices compared (cpu,cpu checks the script)"
    )
    args = ap.parse_args()
    first, second = args.devices.split(",")
    if "cuda" in (first, second) and not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return
    batches = synthetic_batches(args.steps, 512, args.d, 4 * args.d, seed=0)
    models = {
        "topk": make_model_config(type="topk", n_latents=8 * args.d, k=32),
        "compsae": make_model_config(type="compsae", n_latents=8 * args.d, k=32),
    }
    for name, mcfg in models.items():
        cpu = np.array(fvu_curve(mcfg, first, batches, 0))
        gpu = np.array(fvu_curve(mcfg, second, batches, 0))
        n = min(len(cpu), len(gpu))
        corr = float(np.corrcoef(cpu[:n], gpu[:n])[0, 1])
        print(f"{name}: cpu FVU {np.round(cpu[:n], 3).tolist()}")
        print(f"{name}: gpu FVU {np.round(gpu[:n], 3).tolist()}")
        print(f"RESULT fvu_curve_corr_{name}={corr:.4f}")
        print(f"RESULT fvu_final_cuda_vs_cpu_{name}={gpu[n - 1] / cpu[n - 1]:.4f}")


if __name__ == "__main__":
    main()
