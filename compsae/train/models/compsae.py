"""The Compositional SAE: a TopK dictionary plus a gated composition path over the active latents.

    pre   = (x − b_dec) W_enc + b_enc,   (idx, z_idx) = TopK(pre)              # k active latents
    items = z_i · E[i]                   E: [n_latents, d_f]                    # feature-extractor
    stream c     = CompositionNetwork(items)    8-head attention across the k items of ONE token,
    mean-pooled,
                                         feed-forward, projected to [d_c] (see composer.py)
    g     = σ(W_g c + b_g) ∈ [0, 1]^d     (gate off: g = 1)
    x̂     = W_dec z + b_dec + g ⊙ (W_comp c)

Composer "pair" replaces that path by an explicit low-rank sum over pairs of active latents
(`pair_composer.py`): `x̂ = W_dec z + b_dec + Σ_{i<j} s_ij z_i z_j R_ij`, no pooled network, no gate.
With composer "none" the composition path does not exist and the model is exactly `TopKSAE`."""

from __future__ import annotations

import math

import torch
from torch import nn

from compsae.train.config import ModelConfig
from compsae.train.models.base import SAEOutput, reconstruction_loss
from compsae.train.models.composer import CompositionNetwork
from compsae.train.models.pair_composer import PairComposer
from compsae.train.models.topk import TopKSAE, decode_active_latents, dense_codes


class CompSAE(TopKSAE):
    """TopK dictionary + composition network + gated residual (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, d_in: int) -> None:
        super().__init__(cfg, d_in)
        self.m = cfg.final_m  # partners per latent; the trainer runs the curriculum
        self.pair_scale = 1.0  # warm-up factor of the pair penalty (composer "pair")
        self.pair_on = True  # off while the dictionary trains alone (pair_start_fraction)
        self.group_scale = 1.0  # warm-up factor of the pair embeddings' group lasso
        if cfg.composer == "none":
            return
        if cfg.composer == "pair":
            self.pair = PairComposer(
                cfg.n_latents, d_in, cfg.pair_rank, cfg.pair_selection, diagonal=cfg.pair_diagonal
            )
            return
        self.E = nn.Parameter(torch.randn(cfg.n_latents, cfg.d_f) / math.sqrt(cfg.d_f))  # [n, d_f]
        self.composer = CompositionNetwork(
            cfg.d_f, cfg.d_c, cfg.n_heads, cfg.ffn_mult, cfg.composer
        )
        # A small (not zero) W_comp: the path starts quiet but every parameter gets gradient at
        # once.
        self.W_comp = nn.Parameter(
            torch.randn(cfg.d_c, d_in) * (0.1 / math.sqrt(cfg.d_c))
        )  # [d_c, d]
        if cfg.gate:
            self.gate = nn.Linear(cfg.d_c, d_in)
            nn.init.zeros_(self.gate.bias)  # g starts near 1/2 in every dimension

    @property
    def has_composition(self) -> bool:
        return self.cfg.composer != "none"

    def set_schedule(
        self,
        k: int | None = None,
        m: int | None = None,
        l1_scale: float | None = None,
        pair_scale: float | None = None,
        pair_on: bool | None = None,
        group_scale: float | None = None,
    ) -> None:
        super().set_schedule(k=k, l1_scale=l1_scale)
        if m is not None:
            self.m = int(m)
        if pair_scale is not None:
            self.pair_scale = float(pair_scale)
        if pair_on is not None:
            self.pair_on = bool(pair_on)
        if group_scale is not None:
            self.group_scale = float(group_scale)

    def reset_schedule(self) -> None:
        super().reset_schedule()
        self.m = self.cfg.final_m
        self.pair_scale = 1.0
        self.pair_on = True
        self.group_scale = 1.0

    def forward(
        self, x: torch.Tensor, composition: bool = True, need_weights: bool = True
    ) -> SAEOutput:
        """`x: [b, d]` -> `SAEOutput`.  `composition=False` leaves the gated term out of `x_hat`
        (`comp` still holds it, so x̂_on = x_hat + comp).  `need_weights=False` skips the
        attention weights and `item_out` (training then takes the composer's pooled fast path)."""
        return self._forward(x, composition, need_weights)[1]

    def decode_active(
        self, idx: torch.Tensor, vals: torch.Tensor, composition: bool = True
    ) -> torch.Tensor:
        """`x̂: [b, d]` from a token's active latents (`idx`, `vals`: `[b, k]`), without encoding:
        what interventions on codes (a latent's value set to 0) are measured with."""
        return self._decode(idx, vals, composition, need_weights=False).x_hat

    def _forward(
        self, x: torch.Tensor, composition: bool, need_weights: bool
    ) -> tuple[torch.Tensor, SAEOutput]:
        pre, idx, vals = self.active(x)
        return pre, self._decode(idx, vals, composition, need_weights)

    def _decode(
        self, idx: torch.Tensor, vals: torch.Tensor, composition: bool, need_weights: bool
    ) -> SAEOutput:
        linear = (
            decode_active_latents(self.W_dec, idx, vals, self.sparse_decoder) + self.b_dec
        )  # [b, d]
        z = dense_codes(idx, vals, self.cfg.n_latents)
        if self.cfg.composer == "none":
            return SAEOutput(x_hat=linear, z=z, active_idx=idx)
        if self.cfg.composer == "pair":
            # before the path joins its parameters get no gradient at all (Adam starts them fresh
            # when it joins); DistributedDataParallel is told that parameters may go unused
            # residual fit: the codes reach the pair term as fixed inputs (no gradient to the
            # encoder)
            pair_vals = vals.detach() if self.cfg.pair_fit == "residual" else vals
            comp = (
                self.pair(idx, pair_vals, self.m) if self.pair_on else torch.zeros_like(linear)
            )  # [b, d]
            x_hat = linear + comp if composition else linear
            return SAEOutput(x_hat=x_hat, z=z, active_idx=idx, comp=comp)
        # items z_i · E[i] go through attention within the token; c: [b, d_c], attn: [b, h, k, k]
        c, attn, per_item = self.composer(idx, vals, self.E, m=self.m, need_weights=need_weights)
        comp = c @ self.W_comp  # [b, d]
        if self.cfg.gate:
            gate = torch.sigmoid(self.gate(c))  # [b, d]
            comp = gate * comp
        else:
            gate = torch.ones_like(comp)
        x_hat = linear + comp if composition else linear
        return SAEOutput(
            x_hat=x_hat, z=z, attn=attn, active_idx=idx, comp=comp, gate=gate, item_out=per_item
        )

    def compute_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], SAEOutput]:
        pre, out = self._forward(x, composition=True, need_weights=False)
        if self.cfg.composer == "pair" and self.cfg.pair_fit == "residual":
            return self._residual_fit_loss(x, pre, out, dead_mask), out
        terms = self._terms(x, pre, out, dead_mask)
        if self.cfg.composer == "pair":
            idx = out.active_idx
            assert idx is not None
            self._add_pair_penalties(terms, idx, out.z.gather(1, idx))
        return terms, out

    def _add_pair_penalties(
        self, terms: dict[str, torch.Tensor], idx: torch.Tensor, vals: torch.Tensor
    ) -> None:
        """Add the pair penalties of the active latents (`idx`, `vals`: `[b, k]`) to `terms`, in
        place: the bound on the pair terms' norms and the group lasso on E, each with its
        warm-up."""
        if not self.pair_on:
            return
        bound_coef = self.cfg.pair_l1 * self.pair_scale
        group_coef = self.cfg.pair_group_l1 * self.group_scale
        gate_coef = self.cfg.pair_gate_l1 * self.pair_scale
        if gate_coef > 0 and self.cfg.pair_selection == "gated":
            gate = self.pair.gate_penalty(idx)
            terms["pair_gate_l1"] = gate
            terms["loss"] = terms["loss"] + gate_coef * gate
        if bound_coef <= 0 and group_coef <= 0:
            return
        bound, group = self.pair.penalties(idx, vals)
        for name, coef, value in (
            ("pair_l1", bound_coef, bound),
            ("pair_group_l1", group_coef, group),
        ):
            if coef > 0:
                terms[name] = value
                terms["loss"] = terms["loss"] + coef * value

    def _residual_fit_loss(
        self, x: torch.Tensor, pre: torch.Tensor, out: SAEOutput, dead_mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """`pair_fit: residual`: the dictionary is trained exactly as a TopK SAE (on its own
        reconstruction), and the pair term only on what the dictionary leaves, with the codes and
        the dictionary's output held fixed: the path cannot take over variance the dictionary could
        explain, and the dictionary never leans on the path."""
        idx = out.active_idx
        assert idx is not None and out.comp is not None
        linear = out.x_hat - out.comp  # [b, d] dictionary alone
        terms = self._terms(x, pre, SAEOutput(x_hat=linear, z=out.z, active_idx=idx), dead_mask)
        terms["recon_dictionary"] = terms["recon"]
        if not self.pair_on:
            return terms
        pair_recon = reconstruction_loss(
            x, linear.detach() + out.comp
        )  # out.comp saw the codes detached
        terms["recon"] = pair_recon.detach()
        terms["loss"] = terms["loss"] + pair_recon
        self._add_pair_penalties(terms, idx, out.z.gather(1, idx).detach())
        return terms
