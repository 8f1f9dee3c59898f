"""JumpReLU SAE (Rajamanoharan et al. 2024): a ReLU SAE whose latent i fires only above its own
threshold θ_i.  Here for SAEs imported from SAELens (Gemma Scope and others); compsae does not train
it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compsae.errors import UserError
from compsae.train.config import ModelConfig
from compsae.train.models.base import SAEOutput, SparseAutoencoder


class JumpReLUSAE(SparseAutoencoder):
    """`pre = (x − b_dec) W_enc + b_enc`, `z = ReLU(pre) · [pre > θ]`, `x̂ = z W_dec + b_dec`;
    `threshold: [n]` is θ."""

    def __init__(self, cfg: ModelConfig, d_in: int) -> None:
        super().__init__(cfg, d_in)
        self.threshold = nn.Parameter(torch.zeros(cfg.n_latents))

    def forward(self, x: torch.Tensor) -> SAEOutput:
        pre = self.pre_activations(x)  # [b, n]
        z = F.relu(pre) * (pre > self.threshold)
        return SAEOutput(x_hat=self.decode(z), z=z)

    def compute_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], SAEOutput]:
        # the step function needs a straight-through estimator and an L0 penalty; compsae only
        # evaluates JumpReLU SAEs trained elsewhere
        raise UserError(
            "JumpReLU SAEs are imported (`compsae import --format saelens`), not trained by "
            "compsae; "
            "train a topk, relu or compsae model instead"
        )
