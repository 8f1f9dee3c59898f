"""Train one dictionary of a grid cell on in-memory rows with the project's own Trainer (same
schedules, penalties and defaults as `compsae train`), resumable from its folder."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from compsae.train.checkpoint import load_model, read_meta, read_resume_meta, remove_checkpoint
from compsae.train.config import ModelConfig, TrainConfig
from compsae.train.models import SparseAutoencoder, build_model
from compsae.train.records import CheckpointMeta
from compsae.train.trainer import Trainer


def normalise_scale(x: np.ndarray) -> float:
    """The factor that brings rows to mean norm sqrt(d), as the store loader does."""
    return float(np.sqrt(x.shape[1]) / max(np.linalg.norm(x, axis=1).mean(), 1e-12))


def _batches(x: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            if len(idx) == batch:
                yield x[idx]


def fit_dictionary(
    x: np.ndarray,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    folder: str,
    progress: bool = False,
) -> SparseAutoencoder:
    """Train `model_cfg` on rows `x: [rows, d]` (already normalised) into `folder`; a finished
    checkpoint of the same config is loaded instead, an unfinished one is resumed."""
    blob = json.dumps(
        {
            "model": model_cfg.model_dump(mode="json"),
            "train": train_cfg.model_dump(mode="json"),
            "rows": int(len(x)),
            "data": hashlib.sha256(x[:256].tobytes()).hexdigest(),
        },
        sort_keys=True,
    )
    config_hash = hashlib.sha256(blob.encode()).hexdigest()[:16]
    meta = read_meta(folder)
    resume_meta = read_resume_meta(folder)
    if meta is not None and meta.get("finished") and meta.get("config_hash") == config_hash:
        model, _ = load_model(folder)
        model.eval()
        return model
    if any(m is not None and m.get("config_hash") != config_hash for m in (meta, resume_meta)):
        remove_checkpoint(folder)  # the cell changed: its old training (written by this code) goes
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg, x.shape[1])
    trainer = Trainer(
        model,
        model_cfg,
        train_cfg,
        folder,
        CheckpointMeta.start(model_cfg, x.shape[1], config_hash=config_hash),
        progress=progress,
    )
    trainer.resume()
    rows = torch.from_numpy(x)
    # the batch order restarts from the step reached (seeded by it): a resumed fit is deterministic
    trainer.fit(_batches(rows, train_cfg.batch_size, train_cfg.seed + trainer.step))
    model.cpu().eval()  # scoring runs on the CPU, whatever the device it trained on
    return model


def encode_all(model: Any, x: np.ndarray, batch: int = 4096) -> dict[str, np.ndarray]:
    """Codes `z: [rows, n]`, reconstruction `x_hat` and the pair-path part `comp` (zeros without
    composition)."""
    zs, xh, comps = [], [], []
    with torch.no_grad():
        for lo in range(0, len(x), batch):
            out = model(torch.from_numpy(x[lo : lo + batch]))
            zs.append(out.z.float().numpy())
            xh.append(out.x_hat.float().numpy())
            comps.append(
                out.comp.float().numpy() if out.comp is not None else np.zeros_like(xh[-1])
            )
    return {"z": np.concatenate(zs), "x_hat": np.concatenate(xh), "comp": np.concatenate(comps)}
