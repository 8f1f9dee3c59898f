"""Composition measured by intervention: the mixed difference of the reconstruction for a pair.

For a token with active latents (idx, vals) and two of them, i and j,

    Δ_ij = x̂(z) − x̂(z∖i) − x̂(z∖j) + x̂(z∖ij)          (z∖i: latent i's code set to 0)

is what i and j do together beyond what each does alone.  A purely additive decoder gives exactly
0; the pairwise decoder gives exactly its pair term `s_ij z_i z_j R_ij` (with s = 1), which is why
its effects can be read off the term without the four decodes (`pair_terms`, tested equal).

`PairEffectSums` accumulates, per latent pair and over the tokens where both fire: the count, the
summed ‖Δ_ij‖ and the summed reconstruction gain of keeping the pair's term,
`‖x − (x̂ − Δ_ij)‖² − ‖x − x̂‖²`.  The composition matrix and every "partners" statistic are built
from these sums; attention weights are a secondary view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compsae.analysis.pair_calls import t_statistic

# Token rows per chunk of the explicit intervention: [rows, pairs, d] tensors stay small.
INTERVENTION_ROWS = 64


def pair_positions(k: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (a, b), a < b, of every pair among k items: two `[k(k-1)/2]` tensors."""
    a, b = torch.triu_indices(k, k, offset=1, device=device)
    return a, b


def exact_pair_terms(model: Any) -> bool:
    """Whether `model`'s mixed differences equal its pair terms exactly (pairwise decoder, all
    pairs)."""
    cfg = getattr(model, "cfg", None)
    return bool(
        cfg is not None and getattr(cfg, "composer", None) == "pair" and cfg.pair_selection == "all"
    )


@torch.no_grad()
def mixed_differences(model: Any, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Δ for every pair of positions of every token, by intervention: `idx`, `vals: [b, k]` ->
    `[b, k(k-1)/2, d]` (pairs in `pair_positions` order).  Four decodes per pair, through
    `model.decode_active`; pairs where either code is 0 come out as 0 up to rounding."""
    b, k = idx.shape
    pa, pb = pair_positions(k, idx.device)
    n_pairs = pa.shape[0]
    out = []
    for lo in range(0, b, INTERVENTION_ROWS):
        i_rows, v_rows = idx[lo : lo + INTERVENTION_ROWS], vals[lo : lo + INTERVENTION_ROWS]
        r = i_rows.shape[0]
        full = model.decode_active(i_rows, v_rows)  # [r, d]
        eye = torch.eye(k, dtype=torch.bool, device=idx.device)
        keep_a, keep_b = ~eye[pa], ~eye[pb]  # [P, k]
        variants = torch.stack([keep_a, keep_b, keep_a & keep_b])  # [3, P, k]
        v = (v_rows[:, None, None, :] * variants[None]).reshape(-1, k)  # [r·3·P, k]
        i = i_rows[:, None, None, :].expand(r, 3, n_pairs, k).reshape(-1, k)
        dec = model.decode_active(i, v).view(r, 3, n_pairs, -1)
        out.append(full[:, None] - dec[:, 0] - dec[:, 1] + dec[:, 2])
    return torch.cat(out)


@torch.no_grad()
def pair_terms(model: Any, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """The pairwise decoder's terms `z_i z_j R_ij` for every pair of positions: `[b, k(k-1)/2,
    d]`."""
    pa, pb = pair_positions(idx.shape[1], idx.device)
    u = model.pair.items(idx, vals)  # [b, k, r]
    return (u[:, pa] * u[:, pb]) @ model.pair.W_out


@torch.no_grad()
def norms_and_gains(
    model: Any, idx: torch.Tensor, vals: torch.Tensor, resid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token and pair of positions: ‖Δ‖ and the gain of keeping the pair's term,
    `‖r + Δ‖² − ‖r‖² = 2 r·Δ + ‖Δ‖²` with `resid: [b, d]` = x − x̂; two `[b, k(k-1)/2]` tensors.
    For the pairwise decoder the `[b, P, d]` effects are never formed: with c = u_a ⊙ u_b,
    ‖Δ‖² = c G cᵀ (G = W_out W_outᵀ) and r·Δ = c · (W_out r)."""
    if exact_pair_terms(model):
        pa, pb = pair_positions(idx.shape[1], idx.device)
        u = model.pair.items(idx, vals).float()  # [b, k, r]
        c = u[:, pa] * u[:, pb]  # [b, P, r]
        w_out = model.pair.W_out.float()
        sq = ((c @ (w_out @ w_out.T)) * c).sum(-1).clamp_min(0)
        return sq.sqrt(), 2 * (c * (resid.float() @ w_out.T)[:, None]).sum(-1) + sq
    delta = mixed_differences(model, idx, vals).float()  # [b, P, d]
    return delta.norm(dim=-1), 2 * torch.einsum(
        "bd,bpd->bp", resid.float(), delta
    ) + delta.square().sum(-1)


@torch.no_grad()
def typical_code_effects(
    model: Any, codes: torch.Tensor, rms: float = 1.0, block: int = 64
) -> np.ndarray:
    """`[n, n]` symmetric, zero diagonal: ‖Δ_ij‖ / `rms` with only latents i and j active, at their
    typical codes `codes: [n]` (e.g. each latent's mean code when it fires; 0 for a latent that
    never fires gives 0).  The same intervention as in context, outside any context: it is defined
    for every pair, including pairs whose latents seldom fire together, and carries no noise from
    the other active latents.  Exact closed form for the pairwise decoder (‖c_i c_j (E_i ⊙ E_j)
    W_out‖); four decodes per pair otherwise."""
    n = codes.shape[0]
    out = torch.zeros(n, n, dtype=torch.float64)
    codes = codes.float()
    if exact_pair_terms(model):
        u = codes[:, None].to(model.pair.E.device) * model.pair.E.float()  # [n, r]
        w_out = model.pair.W_out.float()
        gram = w_out @ w_out.T  # [r, r]
        for lo in range(0, n, block):
            c = u[lo : lo + block, None, :] * u[None, :, :]  # [blk, n, r]
            out[lo : lo + block] = ((c @ gram) * c).sum(-1).clamp_min(0).sqrt().double().cpu()
    else:
        a, b = pair_positions(n)
        dev = next(model.parameters()).device
        for lo in range(0, a.shape[0], block * INTERVENTION_ROWS):
            ia, ib = a[lo : lo + block * INTERVENTION_ROWS], b[lo : lo + block * INTERVENTION_ROWS]
            idx = torch.stack([ia, ib], 1).to(dev)  # [p, 2]: one "token" per pair
            vals = codes[idx.cpu()].to(dev)
            norms = mixed_differences(model, idx, vals)[:, 0].norm(dim=-1).double().cpu()  # [p]
            out[ia, ib] = norms
            out[ib, ia] = norms
    out.fill_diagonal_(0)
    return (out / (rms or 1.0)).numpy()


@dataclass
class PairEffectSums:
    """Sums over tokens for latent pairs (i < j), both firing: `count`, `norm` (Σ‖Δ‖), `gain`
    (Σ reconstruction gain of keeping the pair's term), `evidence` / `evidence_sq` (Σg, Σg² of
    `g = ⟨r + Δ, Δ/‖Δ‖⟩`, the label-free test's per-token value, see `pair_calls`), each `[n, n]`
    upper-triangular float64, and the totals that put them in units of the data (`n_tokens`,
    `sq_dev`: Σ‖x − μ_batch‖²)."""

    count: np.ndarray
    norm: np.ndarray
    gain: np.ndarray
    evidence: np.ndarray
    evidence_sq: np.ndarray
    n_tokens: int = 0
    sq_dev: float = 0.0

    @classmethod
    def empty(cls, n_latents: int) -> PairEffectSums:
        z = np.zeros((n_latents, n_latents))
        return cls(z.copy(), z.copy(), z.copy(), z.copy(), z.copy())

    @torch.no_grad()
    def update(
        self,
        model: Any,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        idx: torch.Tensor,
        vals: torch.Tensor,
        rows: np.ndarray | None = None,
    ) -> None:
        """Add a batch: rows `x`, their reconstruction `x_hat` (`[b, d]`) and active latents (`[b,
        k]`). `rows: [n_latents]` maps latents to the rows of the sums (−1: not tracked); default
        identity."""
        pa, pb = pair_positions(idx.shape[1], idx.device)
        m = self.count.shape[0]
        lut = torch.as_tensor(np.arange(m) if rows is None else rows, device=idx.device)
        for lo in range(0, x.shape[0], INTERVENTION_ROWS):
            sl = slice(lo, lo + INTERVENTION_ROWS)
            i_rows, v_rows = idx[sl], vals[sl]
            norm, gain = norms_and_gains(model, i_rows, v_rows, x[sl] - x_hat[sl])
            ri, rj = lut[i_rows[:, pa]], lut[i_rows[:, pb]]  # [b, P] tracked rows
            keep = (v_rows[:, pa] > 0) & (v_rows[:, pb] > 0) & (ri >= 0) & (rj >= 0)
            lo_r = torch.minimum(ri, rj)[keep].cpu().numpy().astype(np.int64)
            hi_r = torch.maximum(ri, rj)[keep].cpu().numpy().astype(np.int64)
            flat = lo_r * m + hi_r
            self.count += np.bincount(flat, minlength=m * m).reshape(m, m)
            self.norm += np.bincount(
                flat, weights=norm[keep].double().cpu().numpy(), minlength=m * m
            ).reshape(m, m)
            self.gain += np.bincount(
                flat, weights=gain[keep].double().cpu().numpy(), minlength=m * m
            ).reshape(m, m)
            # g = ⟨r + Δ, Δ/‖Δ‖⟩ = (gain + ‖Δ‖²) / 2‖Δ‖, from the two numbers already measured
            nk, gk = norm[keep].double(), gain[keep].double()
            g = torch.where(nk > 0, (gk + nk.square()) / (2 * nk.clamp_min(1e-30)), 0.0)
            g = g.cpu().numpy()
            self.evidence += np.bincount(flat, weights=g, minlength=m * m).reshape(m, m)
            self.evidence_sq += np.bincount(flat, weights=g * g, minlength=m * m).reshape(m, m)
        self.n_tokens += x.shape[0]
        self.sq_dev += float((x - x.mean(0)).double().square().sum())

    def merge(self, other: PairEffectSums) -> PairEffectSums:
        return PairEffectSums(
            self.count + other.count,
            self.norm + other.norm,
            self.gain + other.gain,
            self.evidence + other.evidence,
            self.evidence_sq + other.evidence_sq,
            self.n_tokens + other.n_tokens,
            self.sq_dev + other.sq_dev,
        )

    def evidence_t(self) -> np.ndarray:
        """`[n, n]` upper-triangular: the one-sided t statistic of `g` per pair (0 below two
        co-firing tokens), the label-free test's statistic (`pair_calls`)."""
        return np.triu(t_statistic(self.evidence, self.evidence_sq, self.count), 1)

    def mean_effect(self, min_support: int = 1) -> np.ndarray:
        """`[n, n]` symmetric: mean ‖Δ_ij‖ over the tokens where both fire, relative to the RMS row
        deviation sqrt(Σ‖x − μ‖² / n_tokens); 0 below `min_support` co-firing tokens."""
        m = (
            np.where(self.count >= max(min_support, 1), self.norm / np.maximum(self.count, 1), 0.0)
            / self.rms
        )
        return m + m.T

    @property
    def rms(self) -> float:
        """RMS row deviation sqrt(Σ‖x − μ‖² / n_tokens): the unit every effect is given in."""
        return float(np.sqrt(self.sq_dev / max(self.n_tokens, 1))) or 1.0

    def gain_share(self) -> np.ndarray:
        """`[n, n]` symmetric: each pair's reconstruction gain as a share of the total variance."""
        g = self.gain / max(self.sq_dev, 1e-30)
        return g + g.T
