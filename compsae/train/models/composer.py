"""The composition network: self-attention over the k active latents of ONE token.

A token's items `z_i · E[i]` (`[b, k, d_f]`) are a set; attention runs along the k axis only,
batched over b, so no token ever sees another token's code (which would bypass the sparsity
budget).  The network is a set function in the Set Transformer shape (Lee et al. 2019): one
multi-head self-attention block over the items, mean-pooling over the set, a feed-forward on the
pooled vector, and a projection to d_c.

Two exact rewrites keep it cheap (b·k items, e.g. 512·32 = 16k per batch):
- the items are linear in E, so `qkv(z_i E[i]) = z_i (E W_qkv)[i] + b`: when b·k exceeds n_latents
  the projection is applied to the n-row table E once, then gathered;
- the attention's output projection and the residual are linear, so they are applied after pooling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def top_m_mask(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Boolean mask `[..., k, k]` keeping each query's `m` highest-scoring keys (exactly m, ties
    broken by index), so each active latent attends to at most m partners."""
    keep = torch.topk(scores, m, dim=-1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, keep, True)


def set_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: int | None, need_weights: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention within each set.  `q, k, v: [b, heads, k, d_head]` -> (`[b, heads, k,
    d_head]`, weights `[b, heads, k, k]` or None).  `m` limits each query to its top-m keys."""
    n_items = q.shape[-2]
    limited = m is not None and m < n_items
    if not limited and not need_weights:
        return F.scaled_dot_product_attention(q, k, v), None  # fused kernel; weights not materialised
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [b, h, k, k]
    if limited:
        scores = scores.masked_fill(~top_m_mask(scores, m), float("-inf"))
    weights = scores.softmax(-1)
    return weights @ v, weights


class FeedForward(nn.Module):
    """Pre-norm residual MLP."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(F.gelu(self.up(self.norm(h))))


class CompositionNetwork(nn.Module):
    """Active latents (`idx`, `vals`: `[b, k]`) and the embedding table `E: [n, d_f]` -> pooled
    composition code `[b, d_c]`, attention weights `[b, heads, k, k]` and, when `need_weights`, each
    item's output of the attention block `[b, k, d_f]` (what an intervention on a partner changes).

    kind "attention": items -> self-attention (+ residual) -> mean over items -> feed-forward -> d_c.
    kind "mlp" (ablation, no interaction between items): mean of the items -> feed-forward -> d_c."""

    def __init__(self, d_f: int, d_c: int, n_heads: int, ffn_mult: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.n_heads = n_heads
        if kind == "attention":
            self.qkv = nn.Linear(d_f, 3 * d_f)
            self.attn_out = nn.Linear(d_f, d_f)
        self.ffn = FeedForward(d_f, ffn_mult * d_f)
        self.to_c = nn.Linear(d_f, d_c)

    def item_qkv(self, idx: torch.Tensor, vals: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """`qkv` of every item `z_i · E[i]`: `[b, k, 3 d_f]`, by the cheaper of two exact routes."""
        b, n_items = idx.shape
        if b * n_items > table.shape[0]:
            proj = table @ self.qkv.weight.t()  # [n, 3 d_f]: once per latent instead of once per item
            # F.embedding, not proj[idx]: its CPU backward sums rows in a fixed order (exact resume)
            return vals.unsqueeze(-1) * F.embedding(idx, proj) + self.qkv.bias
        return self.qkv(vals.unsqueeze(-1) * table[idx])

    def forward(self, idx: torch.Tensor, vals: torch.Tensor, table: torch.Tensor, m: int | None = None,
                need_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        b, n_items = idx.shape
        d_f = table.shape[1]
        vals = vals.to(table.dtype)
        # mean of the items, Σ_i z_i E[i] / k, without materialising [b, k, d_f]
        h = F.embedding_bag(idx, table, per_sample_weights=vals, mode="sum") / n_items  # [b, d_f]
        weights = per_item = None
        if self.kind == "attention":
            qkv = self.item_qkv(idx, vals, table).view(b, n_items, 3, self.n_heads, d_f // self.n_heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, heads, k, d_head]
            mixed, weights = set_attention(q, k, v, m, need_weights)  # [b, heads, k, d_head]
            mixed = mixed.transpose(1, 2).reshape(b, n_items, d_f)  # [b, k, d_f]
            # residual + output projection are linear: pooling first is exact and k times cheaper
            h = h + self.attn_out(mixed.mean(1))
            if need_weights:
                per_item = vals.unsqueeze(-1) * table[idx] + self.attn_out(mixed)
        c = self.to_c(self.ffn(h))  # [b, d_c]
        return c, weights, per_item
