"""The pairwise composition decoder: an explicit sum over pairs of one token's active latents.

    u_i   = z_i · E[i]                               E: [n_latents, r]        (one row per latent)
    c     = Σ_{i<j active} s_ij · u_i ⊙ u_j          [b, r]
    comp  = c W_out                                  W_out: [r, d]
    x̂     = W_dec z + b_dec + comp

So pair (i, j) adds `s_ij · z_i z_j · R_ij` with `R_ij = (E[i] ⊙ E[j]) W_out`: a low-rank bilinear
term that exists only where both latents fire.  There is no pooled network on the output path, so
the term is exactly zero for a token with fewer than two active latents, and with `s_ij = 1` the
mixed difference `x̂(z) − x̂(z∖i) − x̂(z∖j) + x̂(z∖ij)` of a pair is exactly its term: a pair's
composition score is a measured effect.

Selection:
- "all": `s_ij = 1`.  The sum over all pairs has a closed form in O(k·r) per token,
  `Σ_{i<j} u_i ⊙ u_j = ((Σ_i u_i)² − Σ_i u_i²) / 2`.
- "gated": `s_ij = σ(G_ij)`, one learned gate per pair of latents (`G: [n, n]`, symmetrised), so a
  pair's term can be switched off on its own while the bilinear map stays shared; `pair_gate_l1`
  pulls the gates of co-active pairs toward 0.  O(k²·r) per token; `G` costs n² parameters.
- "top_m": each latent keeps its top-m partners by a learned score `(E[i] W_q)·(E[j] W_k)`,
  weighted by a softmax over those m (times m, so uniform weights are 1); the directed weights are
  averaged, `s_ij = (w_ij + w_ji) / 2`.  O(k·m·r); the curriculum moves m.

The penalty `Σ_l ‖W_out[l]‖ · Σ_{i<j} |u_il u_jl|` bounds `Σ_{i<j} ‖z_i z_j R_ij‖` from above
(triangle inequality) and has the same closed form, so unneeded pairs can be driven to zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def pair_sum(u: torch.Tensor) -> torch.Tensor:
    """`Σ_{i<j} u_i ⊙ u_j` over the item axis of `u: [b, k, r]` -> `[b, r]`, in O(k·r)."""
    return (u.sum(1).square() - u.square().sum(1)) / 2


def pair_sum_loop(u: torch.Tensor) -> torch.Tensor:
    """The explicit double loop of `pair_sum` (reference for tests): `[b, k, r]` -> `[b, r]`."""
    out = torch.zeros_like(u[:, 0])
    for i in range(u.shape[1]):
        for j in range(i + 1, u.shape[1]):
            out = out + u[:, i] * u[:, j]
    return out


class PairComposer(nn.Module):
    """Low-rank pairwise composition over one token's active latents (see the module docstring)."""

    def __init__(
        self,
        n_latents: int,
        d_in: int,
        rank: int,
        selection: str = "all",
        score_dim: int = 16,
        diagonal: bool = False,
    ) -> None:
        super().__init__()
        self.selection = selection
        self.diagonal = diagonal  # PolySAE's form: + ½ Σ_i u_i ⊙ u_i, so c = ½ (Σ_i u_i)²
        # W_out starts at zero, so training begins exactly as a TopK SAE and the path grows only
        # where pairs pay for it.  E's scale (codes are O(1) on normalised inputs) was chosen on the
        # bilinear ground truth: std 1 let the early path disturb the dictionary (MCC 0.70-0.82
        # against 0.95 for TopK); 0.1 and 0.3 gave MCC 0.96 and 0.95 with the path joining at 30 %.
        self.E = nn.Parameter(torch.randn(n_latents, rank) * 0.1)  # [n, r]
        self.W_out = nn.Parameter(torch.zeros(rank, d_in))  # [r, d]
        if selection == "gated":
            # gates start near open (σ(2) ≈ 0.88): training begins close to "all", which the
            # ground-truth grid found best, and the penalty closes what the data do not need
            self.G = nn.Parameter(torch.full((n_latents, n_latents), 2.0))
        if selection == "top_m":
            self.W_q = nn.Parameter(torch.randn(rank, score_dim) / math.sqrt(rank))
            self.W_k = nn.Parameter(torch.randn(rank, score_dim) / math.sqrt(rank))

    def items(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """`u_i = z_i E[i]` of the active latents (`idx`, `vals`: `[b, k]`) -> `[b, k, r]`."""
        return vals.unsqueeze(-1).to(self.E.dtype) * F.embedding(idx, self.E)

    def pair_weights(self, idx: torch.Tensor, m: int | None) -> torch.Tensor | None:
        """`s_ij: [b, k, k]` (symmetric, zero diagonal) for "top_m" selection; None for "all" (s =
        1) or when m covers every partner."""
        k = idx.shape[1]
        if self.selection == "gated":
            return self.gates(idx)
        if self.selection != "top_m" or m is None or m >= k - 1:
            return None
        emb = F.embedding(idx, self.E)  # [b, k, r]
        scores = (
            (emb @ self.W_q) @ (emb @ self.W_k).transpose(1, 2) / math.sqrt(self.W_q.shape[1])
        )  # [b, q, key]
        scores = scores.masked_fill(
            torch.eye(k, dtype=torch.bool, device=idx.device), float("-inf")
        )
        top = torch.topk(scores, m, dim=-1)
        w = torch.zeros_like(scores).scatter(
            -1, top.indices, top.values.softmax(-1) * m
        )  # [b, q, key]
        return (w + w.transpose(1, 2)) / 2

    def gates(self, idx: torch.Tensor) -> torch.Tensor:
        """`s_ij = σ((G_ij + G_ji) / 2)` of the active latents `idx: [b, k]` -> `[b, k, k]`,
        symmetric, zero diagonal ("gated" selection)."""
        g = self.G[idx[:, :, None], idx[:, None, :]]  # [b, k, k]
        s = torch.sigmoid((g + g.transpose(1, 2)) / 2)
        return s.masked_fill(torch.eye(idx.shape[1], dtype=torch.bool, device=idx.device), 0.0)

    def gate_penalty(self, idx: torch.Tensor) -> torch.Tensor:
        """Batch mean of `Σ_{i<j active} s_ij` ("gated" selection): an L1 pull on the gates of the
        pairs that co-fire."""
        return self.gates(idx).sum((1, 2)).mean() / 2

    def forward(self, idx: torch.Tensor, vals: torch.Tensor, m: int | None = None) -> torch.Tensor:
        """Composition term `[b, d]` of the active latents (`idx`, `vals`: `[b, k]`)."""
        u = self.items(idx, vals)  # [b, k, r]
        s = self.pair_weights(idx, m)
        # with s: Σ_{i<j} s_ij u_i ⊙ u_j = ½ Σ_i u_i ⊙ (Σ_j s_ij u_j), s symmetric with zero
        # diagonal
        c = pair_sum(u) if s is None else (u * (s @ u)).sum(1) / 2  # [b, r]
        if self.diagonal:
            c = c + u.square().sum(1) / 2
        return c @ self.W_out

    def penalties(self, idx: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two penalties of the active latents (`idx`, `vals`: `[b, k]`), from one gather of the
        items:

                - the bound: batch mean of `Σ_l ‖W_out[l]‖ Σ_{i<j} |u_il u_jl|`, an upper bound on
                  the summed norms of the token's pair terms (all pairs, whatever the selection);
                - the group lasso: batch mean of `Σ_i ‖u_i ⊙ w‖₂`, `w_l = ‖W_out[l]‖` held fixed,
                  over the latents' pair embeddings in output units.  It pulls a latent's whole row
                  toward zero unless its pairs pay for it (a latent that composes with nothing
                  should have no pair term with any partner).  Its pull grows with W_out as the
                  reconstruction's does (both ∝ ‖W_out‖ near zero), so it cannot switch off a path
                  that is still growing; only E gets its gradient."""
        u = self.items(idx, vals)  # [b, k, r]
        w = self.W_out.norm(dim=-1)  # [r]
        bound = (pair_sum(u.abs()) @ w).mean()
        group = (u * w.detach()).norm(dim=-1).sum(1).mean()
        return bound, group

    def pair_term(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """`s_ij R_ij = s_ij (E[i] ⊙ E[j]) W_out` for latent ids `i`, `j: [p]` -> `[p, d]` (unit
        codes; s = 1 but for "gated" selection, whose gate is the pair's own)."""
        term = (self.E[i] * self.E[j]) @ self.W_out
        if self.selection == "gated":
            term = term * torch.sigmoid((self.G[i, j] + self.G[j, i]) / 2)[:, None]
        return term
