"""What every sparse dictionary shares: the output record, b_dec initialisation, the unit-norm
decoder constraint and the schedule knobs the trainer turns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compsae.train.config import ModelConfig


@dataclass
class SAEOutput:
    """One forward pass.  `x_hat: [b, d]`, `z: [b, n]` (dense, zeros where inactive); the rest is
    None where a model has no such thing: `active_idx: [b, k]` the active latents (top-k models),
    `comp: [b, d]` the composition term (gated; in `x_hat` unless the path was switched off, so
    x̂_on = x̂_off + comp), `gate: [b, d]` the gate in [0, 1], `attn: [b, heads, k, k]` attention
    between a token's active latents and `item_out: [b, k, d_f]` each active latent's output of the
    attention block (attention composer)."""

    x_hat: torch.Tensor
    z: torch.Tensor
    attn: torch.Tensor | None = None
    active_idx: torch.Tensor | None = None
    comp: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    item_out: torch.Tensor | None = None

    @property
    def has_composition(self) -> bool:
        """Whether this output carries a composition term."""
        return self.comp is not None


def geometric_median(points: torch.Tensor, iters: int = 100, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to `points: [m, d]`.

    More robust than the mean to the few huge-norm rows (BOS, attention sinks) of LM activations."""
    points = points.double()
    guess = points.mean(0)
    for _ in range(iters):
        dist = torch.linalg.vector_norm(points - guess, dim=-1).clamp_min(eps)  # [m]
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if torch.linalg.vector_norm(new - guess) < eps * (1 + torch.linalg.vector_norm(guess)):
            guess = new
            break
        guess = new
    return guess.float()


def remove_parallel_grad(w_dec: nn.Parameter) -> None:
    """Project out of `w_dec.grad` the component along each unit-norm row `w_dec: [n, d]`, so the
    optimizer step moves directions, not lengths (Bricken et al. 2023)."""
    if w_dec.grad is None:
        return
    with torch.no_grad():
        w = w_dec.data
        parallel = (w_dec.grad * w).sum(-1, keepdim=True)  # [n, 1]
        w_dec.grad -= parallel * w


def normalize_rows_(w: torch.Tensor) -> None:
    """Rescale every row of `w: [n, d]` to unit L2 norm, in place."""
    with torch.no_grad():
        w /= torch.linalg.vector_norm(w, dim=-1, keepdim=True).clamp_min(1e-8)


class SparseAutoencoder(nn.Module):
    """Base of the three dictionaries: encoder `pre = (x - b_dec) W_enc + b_enc`, decoder rows
    `W_dec: [n, d]` (each row one latent's direction), `b_dec: [d]`."""

    def __init__(self, cfg: ModelConfig, d_in: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_in = d_in
        n = cfg.n_latents
        w_dec = torch.randn(n, d_in)
        normalize_rows_(w_dec)
        self.W_dec = nn.Parameter(w_dec)  # [n, d]
        # Encoder initialised as the decoder's transpose (Gao et al. 2024; Conerly et al. 2024).
        self.W_enc = nn.Parameter(w_dec.t().clone())  # [d, n]
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.k = cfg.k  # current k; the trainer anneals it, checkpoints restore cfg.k
        self.l1_scale = 1.0  # warm-up factor of the L1 penalty (relu)

    # -- initialisation and the decoder constraint
    # --------------------------------------------------

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor) -> None:
        """Set `b_dec` from a data sample `[m, d]` (geometric median, mean or zeros per config)."""
        if self.cfg.b_dec_init == "zeros":
            self.b_dec.zero_()
        elif self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(sample.float().mean(0))
        else:
            self.b_dec.copy_(geometric_median(sample.float()))

    def before_optimizer_step(self) -> None:
        """Called after backward: keep decoder rows' gradients tangent to the unit sphere."""
        if self.cfg.unit_norm_decoder:
            remove_parallel_grad(self.W_dec)

    def after_optimizer_step(self) -> None:
        """Called after the step: put decoder rows back on the unit sphere."""
        if self.cfg.unit_norm_decoder:
            normalize_rows_(self.W_dec.data)

    def set_schedule(
        self, k: int | None = None, m: int | None = None, l1_scale: float | None = None
    ) -> None:
        """Turn the schedule knobs (current k, curriculum m, L1 warm-up factor)."""
        if k is not None:
            self.k = min(int(k), self.cfg.n_latents)
        if l1_scale is not None:
            self.l1_scale = float(l1_scale)

    def reset_schedule(self) -> None:
        """Back to the final values (what evaluation uses)."""
        self.set_schedule(k=self.cfg.k, l1_scale=1.0)

    @property
    def has_composition(self) -> bool:
        """Whether the model has a composition path (its outputs then carry `comp`)."""
        return False

    # -- the interface
    # ------------------------------------------------------------------------------

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """`x: [b, d]` -> `[b, n]` before the sparsifying nonlinearity."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """`x: [b, d]` -> dense latents `z: [b, n]`."""
        return self.forward(x).z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Dense latents `z: [b, n]` -> `x_hat: [b, d]` (the linear dictionary part)."""
        return z @ self.W_dec + self.b_dec

    def compute_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], SAEOutput]:
        """Named loss terms ("loss" is the total) and the forward output they came from."""
        raise NotImplementedError

    def loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Named loss terms of a batch `x: [b, d]`; "loss" is the total to minimise."""
        return self.compute_loss(x, dead_mask)[0]


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared L2 error ‖x − x̂‖² (summed over dimensions)."""
    return (x_hat.float() - x.float()).pow(2).sum(-1).mean()
