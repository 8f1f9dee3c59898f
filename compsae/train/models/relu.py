"""The standard ReLU SAE: `z = ReLU((x − b_dec) W_enc + b_enc)` with an L1 penalty, ramped in."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compsae.train.models.base import SAEOutput, SparseAutoencoder, reconstruction_loss


class ReLUSAE(SparseAutoencoder):
    """ReLU + L1 (Bricken et al. 2023).  The L1 term weights each latent by its decoder row's norm,
    so it cannot be dodged by shrinking z and growing W_dec when the unit-norm constraint is off."""

    def forward(self, x: torch.Tensor) -> SAEOutput:
        z = F.relu(self.pre_activations(x))
        return SAEOutput(x_hat=self.decode(z), z=z)

    def compute_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], SAEOutput]:
        out = self.forward(x)
        recon = reconstruction_loss(x, out.x_hat)
        dec_norms = torch.linalg.vector_norm(self.W_dec, dim=-1)  # [n]
        l1 = (out.z.float() * dec_norms).sum(-1).mean()
        coef = self.cfg.l1_coef * self.l1_scale
        return {"loss": recon + coef * l1, "recon": recon, "l1": l1}, out
