"""The composition network: self-attention over the k active latents of ONE token.

A token's items `u_i = z_i · E[i]` (`[b, k, d_f]`) are a set; attention runs along the k axis only,
batched over b, so no token ever sees another token's code (which would bypass the sparsity
budget).  The network is a set function in the Set Transformer shape (Lee et al. 2019):

    q, k, v = u W_qkv + b_qkv, split into heads             [b, heads, k, d_head]
    w       = softmax over the (top-m) keys of q kᵀ/√d_head   [b, heads, k, k]
    mixed_i = Σ_j w_ij v_j                                   [b, k, d_f]
    h       = mean_i (u_i + W_o mixed_i + b_o)               [b, d_f]
    c       = to_c(FFN(h))                                   [b, d_c]

Training needs only the pooled `h`; exact rewrites keep it cheap (b·k = 16k items per batch of
512 tokens, against n_latents = 4096; on CPU every pass over a `[heads, b, k, k]` tensor counts):
- pooling commutes with W_o and the residual, and mean_i Σ_j w_ij v_j = Σ_j a_j v_j with
  a_j = mean_i w_ij (the attention key j receives), so the product w·v is never formed;
- v is linear in the item and Σ_j a_j = 1, so Σ_j a_j v_j = (Σ_j a_j z_j E[j]) W_vᵀ + b_v: values
  are projected once per head and token, not once per item;
- q and k are linear in E: when b·k exceeds n_latents, `P = E Wᵀ` is computed for the table once
  and its rows gathered; q_i·k_j = z_i z_j P_q[i]·P_k[j] + z_j b_q·P_k[j] + (terms without j, which
  neither the softmax nor the top-m choice sees), so the gathered rows need no per-item scaling;
- scores are laid out (key, query) so that every reduction over keys runs along a strided axis
  (vectorised), the top-m threshold comes from a small selection network instead of a per-row
  sort, and the masked softmax with its sum over queries is one autograd node.
`forward(..., need_weights=True)` (analysis) also returns w and each item's block output.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compsae.threads import torch_threads


def top_m_mask(scores: torch.Tensor, m: int, dim: int = -1) -> torch.Tensor:
    """Boolean mask keeping the `m` highest entries of `scores` along `dim` (exactly m; ties at the
    m-th value broken arbitrarily).  With scores `[..., query, key]` and `dim=-1`, each active
    latent attends to its top-m partners."""
    keep = torch.topk(scores, m, dim=dim, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(dim, keep, True)


@torch.no_grad()
def largest_along_keys(scores: torch.Tensor, m: int) -> list[torch.Tensor]:
    """The `m` largest values along dim -2 of `scores: [..., keys, q]`, counting repeats, sorted
    descending: a list of m tensors `[..., q]`.  An insertion network over the keys: each step is an
    elementwise max/min over `[..., q]` slices, much cheaper than a per-row sort when rows are
    short."""
    best: list[torch.Tensor] = []
    # hundreds of small ops: run them on one thread, since a thread-pool barrier per op stalls
    # whenever a core is busy elsewhere (and the slices are too small to gain from splitting)
    with torch_threads(1):
        _insert_keys(scores, m, best)
    return best


def _insert_keys(scores: torch.Tensor, m: int, best: list[torch.Tensor]) -> None:
    for j in range(scores.shape[-2]):
        cur = scores[..., j, :]
        for level in range(m):
            if level == len(best):
                best.append(cur)
                break
            hi = torch.maximum(best[level], cur)
            if level + 1 < m:
                cur = torch.minimum(best[level], cur)
            best[level] = hi


def select_top_keys(
    scores: torch.Tensor, m: int, by_topk: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's `m` highest keys of `scores: [..., keys, q]` -> (their values `[..., m, q]`,
    descending; the mask `[..., keys, q]` of the keys NOT kept).  Exactly m are kept per query, ties
    at the m-th value broken arbitrarily.  `by_topk` (default: on CUDA) picks torch.topk over the
    insertion network."""
    if scores.is_cuda if by_topk is None else by_topk:
        # one top-k kernel and no host sync, where the insertion network would launch hundreds
        top = torch.topk(scores, m, dim=-2)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-2, top.indices, True)
        return top.values, ~keep
    best = largest_along_keys(scores, m + 1)
    drop = scores < best[m - 1].unsqueeze(-2)
    tied = best[m] == best[m - 1]  # more than m keys reach the threshold: rare (z = 0 items)
    if tied.any():
        *lead, col = tied.nonzero(as_tuple=True)
        drop[(*lead, slice(None), col)] = ~top_m_mask(scores[(*lead, slice(None), col)], m)
    return torch.stack(best[:m], -2), drop


class _ReceivedAttention(torch.autograd.Function):
    """Head-major queries and keys (`[H·b, k, d_head]`), `zz: [b, keys, q]` or None, `key_bias:
    [H, b, keys, 1]` -> Σ_q w_jq `[H, b, keys]`, w the softmax over each query's top-m keys (all
    keys when m is None) of the scores `s = (k qᵀ) · zz + key_bias`.  One autograd node that
    allocates two scores-sized tensors forward and one backward: on CPU the composite (about ten
    full-size temporaries, each a pass over memory) costs more than the matmuls."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        zz: torch.Tensor | None,
        key_bias: torch.Tensor,
        m: int | None,
    ) -> torch.Tensor:
        heads, b, n_items = key_bias.shape[:3]
        raw = torch.bmm(k, q.transpose(1, 2)).view(heads, b, n_items, n_items)  # [H, b, key, query]
        w = torch.empty_like(raw)  # contiguous, whatever the broadcast operands' layouts
        if zz is not None:
            torch.addcmul(key_bias, raw, zz, out=w)
        else:
            torch.add(raw, key_bias, out=w)
        if m is not None and m < n_items:
            top, drop = select_top_keys(w, m)  # top: [H, b, m, q] descending
            # the normaliser Σ_kept exp(s − max) comes from the m selected values themselves
            log_z = top.sub(top[..., :1, :]).exp_().sum(-2, keepdim=True).log_()
            w.sub_(top[..., :1, :] + log_z).exp_().masked_fill_(drop, 0.0)
        else:
            w.sub_(w.amax(-2, keepdim=True)).exp_()
            w.div_(w.sum(-2, keepdim=True))
        ctx.save_for_backward(q, k, raw if zz is not None else None, zz, w)
        return w.sum(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, None]:
        q, k, raw, zz, w = ctx.saved_tensors
        # d received_j / d s_jq = w_jq (g_j − Σ_j' w_j'q g_j'); dropped keys have w = 0, so no
        # gradient
        mean_g = grad.unsqueeze(-2) @ w  # [H, b, 1, q]
        ds = torch.sub(grad.unsqueeze(-1), mean_g, out=torch.empty_like(w)).mul_(
            w
        )  # [H, b, key, q]
        grad_bias = ds.sum(-1, keepdim=True)
        grad_zz = None
        if zz is not None:
            grad_zz = ds[0] * raw[0]  # Σ_h ds · raw, head by head: no second full-size temporary
            for h in range(1, ds.shape[0]):
                grad_zz.addcmul_(ds[h], raw[h])
            ds.mul_(zz)
        d_raw = ds.view(k.shape[0], k.shape[1], q.shape[1])  # [H·b, key, query]
        return torch.bmm(d_raw.transpose(1, 2), k), torch.bmm(d_raw, q), grad_zz, grad_bias, None


@torch.compiler.disable
def _received_attention_eager(
    q: torch.Tensor, k: torch.Tensor, zz: torch.Tensor | None, key_bias: torch.Tensor, m: int | None
) -> torch.Tensor:
    """`_ReceivedAttention`, run eagerly inside a compiled step (train.compile): its hand-written
    backward views buffers whose layout inductor may change, and it is one fused node already."""
    return _ReceivedAttention.apply(q, k, zz, key_bias, m)


def received_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    zz: torch.Tensor | None,
    key_bias: torch.Tensor,
    m: int | None,
    need_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention over each query's keys (its top `m` only, when `m` is smaller than the set)
    for the scores `(k qᵀ) · zz + key_bias` `[H, b, keys, q]` (see `_ReceivedAttention`) ->
    (`Σ_q w_jq`: `[H, b, keys]`, the attention each key receives; the weights `w: [H, b, keys, q]`
    when `need_weights`, else None)."""
    if not need_weights:
        return _received_attention_eager(q, k, zz, key_bias, m), None
    # analysis: plain ops, so gradients reach the weights too
    raw = torch.bmm(k, q.transpose(1, 2)).view(
        key_bias.shape[0], key_bias.shape[1], k.shape[1], q.shape[1]
    )
    scores = torch.addcmul(key_bias, raw, zz) if zz is not None else raw + key_bias
    if m is not None and m < scores.shape[-2]:
        scores = scores.masked_fill(~top_m_mask(scores.detach(), m, dim=-2), float("-inf"))
    weights = scores.softmax(-2)
    return weights.sum(-1), weights


class FeedForward(nn.Module):
    """Pre-norm residual MLP."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(F.gelu(self.up(self.norm(h))))


def _head_major(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """`[b, k, heads · d_head]` -> contiguous `[heads · b, k, d_head]` (one batched-matmul
    operand)."""
    b, n_items, d = rows.shape
    return (
        rows.view(b, n_items, heads, d // heads)
        .permute(2, 0, 1, 3)
        .reshape(heads * b, n_items, d // heads)
    )


class _GatherHeads(torch.autograd.Function):
    """`table: [n, heads · d_head]`, `idx: [b, k]` -> `[heads · b, k, d_head]`, row (h, t, i) being
    head h's slice of `table[idx[t, i]]`: the gather lands head-major, so neither direction needs a
    transposing copy.  Backward is `index_add_`, whose CPU loop adds rows in index order: the
    gradient is bitwise reproducible (exact resume)."""

    @staticmethod
    def forward(ctx: Any, table: torch.Tensor, idx: torch.Tensor, heads: int) -> torch.Tensor:
        n, d = table.shape
        flat = (
            idx.unsqueeze(0) * heads + torch.arange(heads, device=idx.device).view(-1, 1, 1)
        ).view(-1)
        ctx.save_for_backward(flat)
        ctx.shape = (n, d, heads)
        return (
            table.view(n * heads, d // heads)
            .index_select(0, flat)
            .view(heads * idx.shape[0], idx.shape[1], -1)
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (flat,) = ctx.saved_tensors
        n, d, heads = ctx.shape
        out = grad.new_zeros(n * heads, d // heads).index_add_(
            0, flat, grad.reshape(-1, d // heads)
        )
        return out.view(n, d), None, None


class CompositionNetwork(nn.Module):
    """Active latents (`idx`, `vals`: `[b, k]`) and the embedding table `E: [n, d_f]` -> pooled
    composition code `[b, d_c]` and, when `need_weights`, the attention weights `[b, heads, k, k]`
    (query, key) and each item's output of the attention block `[b, k, d_f]` (what an intervention
    on a partner changes).

    kind "attention": items -> self-attention (+ residual) -> mean over items -> feed-forward ->
    d_c. kind "mlp" (ablation, no interaction between items): mean of the items -> feed-forward ->
    d_c."""

    def __init__(self, d_f: int, d_c: int, n_heads: int, ffn_mult: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.n_heads = n_heads
        if kind == "attention":
            self.qkv = nn.Linear(d_f, 3 * d_f)  # rows q | k | v, each head after head
            self.attn_out = nn.Linear(d_f, d_f)
        self.ffn = FeedForward(d_f, ffn_mult * d_f)
        self.to_c = nn.Linear(d_f, d_c)

    def scores(
        self, idx: torch.Tensor, vals: torch.Tensor, table: torch.Tensor, items: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Attention scores of every token's items, up to a per-query constant (see the module
        docstring), as `raw · zz + key_bias`: (`raw: [heads, b, key, query]`, `zz: [b, key, query]`
        or None, `key_bias: [heads, b, key, 1]`).  `items: [b, k, d_f]` (the `z_i E[i]`) is used
        when projecting the items is cheaper than projecting the table (b·k <= n_latents)."""
        b, n_items = idx.shape
        n, d_f = table.shape
        heads = self.n_heads
        d_head = d_f // heads
        w_q = self.qkv.weight[:d_f] / math.sqrt(d_head)
        b_q = (self.qkv.bias[:d_f] / math.sqrt(d_head)).view(heads, d_head)
        w_k = self.qkv.weight[d_f : 2 * d_f]
        from_table = items is None or b * n_items > n
        if from_table:
            p_k = table @ w_k.t()  # [n, d_f]: once per latent instead of once per item
            # F.embedding, not p[idx]: its CPU backward sums rows in a fixed order (exact resume)
            q = _GatherHeads.apply(table @ w_q.t(), idx, heads)  # [H·b, k, d_head]: P_q[i]
            k = _GatherHeads.apply(p_k, idx, heads)
            key_bias = (
                F.embedding(idx, torch.einsum("nhd,hd->nh", p_k.view(n, heads, d_head), b_q))
                * vals[..., None]
            )
        else:
            rows_k = F.linear(items, w_k)  # z_j P_k[j]
            key_bias = torch.einsum("bkhd,hd->bkh", rows_k.view(b, n_items, heads, d_head), b_q)
            q, k = _head_major(F.linear(items, w_q), heads), _head_major(rows_k, heads)
        key_bias = key_bias.permute(2, 0, 1).unsqueeze(-1)  # [H, b, key, 1]: z_j b_q·P_k[j]
        zz = vals.unsqueeze(-1) * vals.unsqueeze(-2) if from_table else None  # z_j z_i
        return q, k, zz, key_bias

    def forward(
        self,
        idx: torch.Tensor,
        vals: torch.Tensor,
        table: torch.Tensor,
        m: int | None = None,
        need_weights: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        b, n_items = idx.shape
        d_f = table.shape[1]
        vals = vals.to(table.dtype)
        if self.kind != "attention":
            # mean of the items, Σ_i z_i E[i] / k, without materialising [b, k, d_f]
            h = (
                F.embedding_bag(idx, table, per_sample_weights=vals, mode="sum") / n_items
            )  # [b, d_f]
            return self.to_c(self.ffn(h)), None, None
        heads = self.n_heads
        d_head = d_f // heads
        emb = F.embedding(idx, table)  # [b, k, d_f]: E[i] of every item
        items = (
            vals.unsqueeze(-1) * emb if (need_weights or b * n_items <= table.shape[0]) else None
        )
        q, k, zz, key_bias = self.scores(idx, vals, table, items)
        received, weights = received_attention(q, k, zz, key_bias, m, need_weights)  # [H, b, key]
        # one batched product: per token, Σ_j (a_hj z_j) E[j] for every head h, and Σ_j (z_j / k)
        # E[j]
        coef = torch.cat(
            [(received / n_items * vals).transpose(0, 1), (vals / n_items).unsqueeze(1)], 1
        )
        pooled = torch.bmm(coef, emb)  # [b, H + 1, d_f]
        w_v = self.qkv.weight[2 * d_f :].view(heads, d_head, d_f)
        values = (
            torch.einsum("bhf,hdf->bhd", pooled[:, :heads], w_v).reshape(b, d_f)
            + self.qkv.bias[2 * d_f :]
        )
        h = pooled[:, heads] + self.attn_out(values)  # [b, d_f] = mean_i (u_i + W_o mixed_i + b_o)
        c = self.to_c(self.ffn(h))  # [b, d_c]
        if not need_weights:
            return c, None, None
        v = F.linear(items, self.qkv.weight[2 * d_f :], self.qkv.bias[2 * d_f :])  # [b, k, d_f]
        v = v.view(b, n_items, heads, d_head).permute(2, 0, 1, 3)  # [H, b, k, d_head]
        mixed = (weights.transpose(-1, -2) @ v).permute(1, 2, 0, 3).reshape(b, n_items, d_f)
        per_item = items + self.attn_out(mixed)
        return c, weights.permute(1, 0, 3, 2), per_item  # weights [b, H, query, key]
