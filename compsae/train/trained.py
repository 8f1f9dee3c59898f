"""`TrainedSAE`: one trained (or imported) model as every later stage uses it.

It holds the model, its checkpoint metadata and what follows from them: the normalisation scale
(the model saw `x * scale`, x in store units), the hook, the held-out split, whether the model has
a composition path, and `forward` / `reconstruct` on store-unit rows.  Analyze, the probes, the
human-evaluation export, the ground-truth comparison and the held-out metrics all load models
through it, so none re-derives the scale or the kind."""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import numpy as np
import torch

from compsae.errors import UserError
from compsae.files import CONFIG_FILE, MODEL_FILE
from compsae.store.split import HeldOutSplit
from compsae.train.checkpoint import load_model, parse_meta
from compsae.train.models import SparseAutoencoder
from compsae.train.models.base import SAEOutput
from compsae.train.records import CheckpointMeta


@dataclass
class TrainedSAE:
    """A model folder of the train stage, loaded."""

    name: str
    folder: str
    model: SparseAutoencoder
    meta: CheckpointMeta

    @classmethod
    def load(cls, folder: str, device: str | torch.device = "cpu", name: str | None = None) -> TrainedSAE:
        """The model saved in `folder` (eval mode, schedule at its end), named after the folder."""
        model, meta = load_model(folder, device)
        return cls(name or folder.rstrip("/").rsplit("/", 1)[-1], folder, model, parse_meta(meta, folder))

    @property
    def scale(self) -> float:
        return self.meta.scale

    @property
    def hook(self) -> str:
        return self.meta.hook

    @property
    def kind(self) -> str:
        return self.meta.type

    @property
    def n_latents(self) -> int:
        return int(self.meta.model.n_latents)

    @property
    def split(self) -> HeldOutSplit | None:
        """The held-out split it was trained with; None for a model trained elsewhere."""
        return self.meta.split

    @property
    def has_composition(self) -> bool:
        return self.model.has_composition

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, x: np.ndarray | torch.Tensor, **kwargs: bool) -> SAEOutput:
        """The model's output on store-unit rows `x: [b, d]` (scaled as in training first); the
        output is in model units (divide by `scale` for store units)."""
        xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x.float()
        return self.model(xt.to(self.device) * self.scale, **kwargs)

    @torch.no_grad()
    def reconstruct(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """`x̂: [b, d]` in store units of store-unit rows `x: [b, d]`."""
        return self.forward(x).x_hat / self.scale


def model_folders(train_dir: str) -> list[tuple[str, str]]:
    """(name, folder) of every model folder (a sub-folder holding config.json) of a train-stage
    output, sorted by name."""
    fs, root = fsspec.core.url_to_fs(train_dir)
    if not fs.isdir(root):
        raise UserError(f"no train stage folder at {train_dir}; run `compsae train` first")
    prefix = train_dir.rstrip("/")
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.isdir(p))
    base = root.rstrip("/")
    for n in names:
        # weights without their metadata: leaving the model out silently would drop it from the
        # metrics, so say which folder is broken instead
        if fs.exists(f"{base}/{n}/{MODEL_FILE}") and not fs.exists(f"{base}/{n}/{CONFIG_FILE}"):
            raise UserError(f"{prefix}/{n} has {MODEL_FILE} but no {CONFIG_FILE}; restore it or retrain")
    return [(n, f"{prefix}/{n}") for n in names if fs.exists(f"{base}/{n}/{CONFIG_FILE}")]


def load_trained(train_dir: str, device: str | torch.device = "cpu") -> list[TrainedSAE]:
    """Every model of a train-stage output, sorted by name."""
    return [TrainedSAE.load(folder, device, name) for name, folder in model_folders(train_dir)]
