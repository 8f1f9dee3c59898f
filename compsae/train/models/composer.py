"""The composition network: self-attention over the k active latents of ONE token.

Items `[b, k, d_f]` are a set per token; attention runs along the k axis only, batched over b, so
no token ever sees another token's code (which would bypass the sparsity budget)."""

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
    """Pre-norm residual MLP applied to every item on its own."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(F.gelu(self.up(self.norm(h))))


class CompositionNetwork(nn.Module):
    """Items `[b, k, d_f]` -> pooled composition code `[b, d_c]` (+ attention weights).

    kind "attention": one pre-norm block of `n_heads`-head self-attention across a token's items and a
    feed-forward; kind "mlp": the feed-forward alone (the ablation without interaction)."""

    def __init__(self, d_f: int, d_c: int, n_heads: int, ffn_mult: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.n_heads = n_heads
        if kind == "attention":
            self.attn_norm = nn.LayerNorm(d_f)
            self.qkv = nn.Linear(d_f, 3 * d_f)
            self.attn_out = nn.Linear(d_f, d_f)
        self.ffn = FeedForward(d_f, ffn_mult * d_f)
        self.to_c = nn.Linear(d_f, d_c)

    def forward(self, items: torch.Tensor, m: int | None = None, need_weights: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n_items, d_f = items.shape
        h, weights = items, None
        if self.kind == "attention":
            qkv = self.qkv(self.attn_norm(h)).view(b, n_items, 3, self.n_heads, d_f // self.n_heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, heads, k, d_head]
            mixed, weights = set_attention(q, k, v, m, need_weights)
            h = h + self.attn_out(mixed.transpose(1, 2).reshape(b, n_items, d_f))
        h = self.ffn(h)
        c = self.to_c(h)  # [b, k, d_c]
        return c.mean(1), weights  # mean, not sum: the pooled scale stays put while k anneals
