"""Downstream faithfulness: next-token loss with the hook's activation replaced (docs/metrics.md).

The LM is not analysis's business: the harvest stage provides
    `ce_fn(tokens: LongTensor [b, ctx], replace: Callable[[Tensor [b, ctx, d]], Tensor] | None)
        -> (ce: Tensor [b, ctx − 1] per-token next-token loss in nats, logits: Tensor [b, ctx,
        vocab])`
running the model with the hook's activation passed through `replace` (None = clean run).
From three runs (clean, zero-ablated, x̂ spliced in) this module computes CE-loss recovered
`(CE_zero − CE_recon) / (CE_zero − CE_clean)`, ΔCE = CE_recon − CE_clean and the KL score
`(KL_zero − KL_recon) / KL_zero`, with KL to the clean next-token distribution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

CEFn = Callable[
    [torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None], tuple[torch.Tensor, torch.Tensor]
]


def kl_to_clean(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_clean ‖ p): `[b, ctx, vocab]` each -> scalar (nats)."""
    lp_clean = F.log_softmax(clean_logits.double(), -1)
    lp = F.log_softmax(logits.double(), -1)
    return (lp_clean.exp() * (lp_clean - lp)).sum(-1).mean()


def ce_metrics(
    ce_fn: CEFn, tokens: torch.Tensor, reconstruct: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, float]:
    """CE clean / zero / recon, CE recovered, ΔCE and the KL score of one model on `tokens: [b,
    ctx]`.

        `reconstruct` maps the hook activation `[b, ctx, d]` to x̂ of the same shape (original
        units)."""
    with torch.no_grad():
        ce_clean, lg_clean = ce_fn(tokens, None)
        ce_zero, lg_zero = ce_fn(tokens, torch.zeros_like)
        ce_rec, lg_rec = ce_fn(tokens, reconstruct)
    clean, zero, rec = (float(c.double().mean()) for c in (ce_clean, ce_zero, ce_rec))
    kl_zero = float(kl_to_clean(lg_clean, lg_zero))
    kl_rec = float(kl_to_clean(lg_clean, lg_rec))
    nan = float("nan")
    return {
        "ce_clean": clean,
        "ce_zero": zero,
        "ce_recon": rec,
        "ce_recovered": (zero - rec) / (zero - clean) if zero != clean else nan,
        "delta_ce": rec - clean,
        "kl_zero": kl_zero,
        "kl_recon": kl_rec,
        "kl_score": (kl_zero - kl_rec) / kl_zero if kl_zero > 0 else nan,
    }
