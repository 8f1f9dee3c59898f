"""The sparse dictionaries: `CompSAE` and the `TopKSAE` / `ReLUSAE` baselines, one interface
(`JumpReLUSAE` too, for SAEs imported from SAELens)."""

from __future__ import annotations

from compsae.errors import UserError
from compsae.train.config import ModelConfig
from compsae.train.models.base import SAEOutput, SparseAutoencoder
from compsae.train.models.compsae import CompSAE
from compsae.train.models.jumprelu import JumpReLUSAE
from compsae.train.models.relu import ReLUSAE
from compsae.train.models.topk import TopKSAE

MODEL_TYPES: dict[str, type[SparseAutoencoder]] = {
    "compsae": CompSAE,
    "topk": TopKSAE,
    "relu": ReLUSAE,
    "jumprelu": JumpReLUSAE,
}


def build_model(cfg: ModelConfig, d_in: int) -> SparseAutoencoder:
    """A freshly initialised model of `cfg.type` for inputs of width `d_in`."""
    if cfg.type not in MODEL_TYPES:
        raise UserError(f"unknown model type {cfg.type!r}; choose one of {', '.join(MODEL_TYPES)}")
    if cfg.k > cfg.n_latents:
        raise UserError(
            f"k ({cfg.k}) is larger than n_latents ({cfg.n_latents}); lower k or widen the "
            "dictionary"
        )
    return MODEL_TYPES[cfg.type](cfg, d_in)


__all__ = [
    "MODEL_TYPES",
    "CompSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "SAEOutput",
    "SparseAutoencoder",
    "TopKSAE",
    "build_model",
]
