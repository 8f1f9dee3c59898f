"""A pairwise CompSAE with hand-set weights, shared by the pair tests."""

from __future__ import annotations

import torch

from compsae.train.config import make_model_config
from compsae.train.models import build_model

N, D, R = 16, 32, 16  # latents, input width, pair rank


def composer() -> torch.nn.Module:
    """A pairwise CompSAE whose encoder reads only the first N coordinates and whose pair terms
    live only in the other D − N, so encoding a row gives the same two latents whatever pair
    terms the row carries."""
    torch.manual_seed(0)
    cfg = make_model_config(type="compsae", composer="pair", n_latents=N, k=2, pair_rank=R, aux_k=0)
    model = build_model(cfg, D)
    with torch.no_grad():
        eye = torch.eye(N)
        model.W_dec.zero_()
        model.W_dec[:, :N] = eye
        model.W_enc.zero_()
        model.W_enc[:N] = eye
        model.b_enc.zero_()
        model.b_dec.zero_()
        model.pair.E.copy_(torch.randn(N, R))
        model.pair.W_out.zero_()
        model.pair.W_out[:, N:] = torch.randn(R, D - N) / R**0.5
    return model.eval()
