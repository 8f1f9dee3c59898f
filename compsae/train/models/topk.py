"""TopK SAE (Gao et al. 2024): exactly k active latents per token, AuxK loss for dead latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compsae.train.models.base import SAEOutput, SparseAutoencoder, reconstruction_loss


def topk_codes(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest pre-activations of each row, `pre: [b, n]` -> (`idx: [b, k]`, `vals: [b, k]`).

    Values pass a ReLU, so a token with fewer than k positive pre-activations has zeros among its
    k."""
    vals, idx = torch.topk(pre, k, dim=-1, sorted=False)
    return idx, F.relu(vals)


def dense_codes(idx: torch.Tensor, vals: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Scatter `vals: [b, k]` at `idx: [b, k]` into a dense `[b, n_latents]` tensor."""
    return torch.zeros(idx.shape[0], n_latents, dtype=vals.dtype, device=vals.device).scatter(
        1, idx, vals
    )


def sparse_decode(w_dec: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Σ_i vals_i · W_dec[idx_i] without the dense [b, n] product: `[b, k]` -> `[b, d]`."""
    return F.embedding_bag(idx, w_dec.to(vals.dtype), per_sample_weights=vals, mode="sum")


def dense_decode(w_dec: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """The same sum as `sparse_decode` through the dense `[b, n] @ [n, d]` product: the reference
    path (and the faster one where a backend lacks a fused gather), `[b, k]` -> `[b, d]`."""
    return dense_codes(idx, vals, w_dec.shape[0]) @ w_dec.to(vals.dtype)


def decode_active_latents(
    w_dec: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, sparse: bool = True
) -> torch.Tensor:
    """`sparse_decode` or `dense_decode`, as `sparse` selects."""
    return sparse_decode(w_dec, idx, vals) if sparse else dense_decode(w_dec, idx, vals)


def auxk_loss(
    pre: torch.Tensor,
    residual: torch.Tensor,
    w_dec: torch.Tensor,
    dead_mask: torch.Tensor | None,
    aux_k: int,
) -> torch.Tensor:
    """AuxK (Gao et al. 2024): reconstruct the residual `x − x̂` from the top `aux_k` *dead* latents,
    so their encoder rows receive gradient again.  `pre: [b, n]`, `residual: [b, d]` (detached)."""
    zero = pre.new_zeros(())
    if dead_mask is None or aux_k == 0:
        return zero
    if (
        torch.compiler.is_compiling() or pre.is_cuda
    ):  # no read of the dead count: no host sync per step
        return _auxk_loss_static(pre, residual, w_dec, dead_mask, aux_k)
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return zero
    masked = pre.masked_fill(~dead_mask, float("-inf"))
    idx, vals = topk_codes(masked, min(aux_k, n_dead))
    e_hat = sparse_decode(w_dec, idx, vals)
    return reconstruction_loss(residual, e_hat)


def _auxk_loss_static(
    pre: torch.Tensor,
    residual: torch.Tensor,
    w_dec: torch.Tensor,
    dead_mask: torch.Tensor,
    aux_k: int,
) -> torch.Tensor:
    """`auxk_loss` without reading the dead count on the host: a compiled step then has no graph
    break, no host sync and one shape whatever the count.  The top `aux_k` of the masked
    pre-activations take every dead latent the eager form takes; the live ones among them sit at
    −inf, which the ReLU makes 0 (no term, no gradient).  With no dead latent the loss is 0."""
    masked = pre.masked_fill(~dead_mask, float("-inf"))
    idx, vals = topk_codes(masked, min(aux_k, pre.shape[1]))
    e_hat = sparse_decode(w_dec, idx, vals)
    return reconstruction_loss(residual, e_hat) * dead_mask.any()


class TopKSAE(SparseAutoencoder):
    """`z = TopK(ReLU((x − b_dec) W_enc + b_enc))`, `x̂ = z W_dec + b_dec`, unit-norm decoder rows.

    `sparse_decoder` (default True) gathers the k active rows of `W_dec`; False takes the dense
    product instead (same output and gradients, kept for comparison and odd backends)."""

    sparse_decoder: bool = True

    def active(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-activations `[b, n]` and the active latents (`idx`, `vals`: `[b, k]`) of `x: [b,
        d]`."""
        pre = self.pre_activations(x)
        idx, vals = topk_codes(pre, self.k)
        return pre, idx, vals

    def forward(self, x: torch.Tensor) -> SAEOutput:
        _, idx, vals = self.active(x)
        x_hat = decode_active_latents(self.W_dec, idx, vals, self.sparse_decoder) + self.b_dec
        z = dense_codes(idx, vals, self.cfg.n_latents)
        return SAEOutput(x_hat=x_hat, z=z, active_idx=idx)

    def compute_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], SAEOutput]:
        pre, idx, vals = self.active(x)
        x_hat = decode_active_latents(self.W_dec, idx, vals, self.sparse_decoder) + self.b_dec
        out = SAEOutput(x_hat=x_hat, z=dense_codes(idx, vals, self.cfg.n_latents), active_idx=idx)
        return self._terms(x, pre, out, dead_mask), out

    def _terms(
        self, x: torch.Tensor, pre: torch.Tensor, out: SAEOutput, dead_mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        recon = reconstruction_loss(x, out.x_hat)
        aux = auxk_loss(
            pre, (x - out.x_hat).detach().float(), self.W_dec, dead_mask, self.cfg.aux_k
        )
        return {"loss": recon + self.cfg.aux_coef * aux, "recon": recon, "auxk": aux}
