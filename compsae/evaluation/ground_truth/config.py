"""The ground-truth stage's config: synthetic activations with known features and interactions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class GroundTruthConfig(BaseModel):
    """Synthetic activations ``x = Σ a_i v_i + Σ_c b_c u_c·[all constituents of c fire] + noise``.

    Base features fire independently with Zipf-like probabilities; each interaction group also has
    its own co-firing event (probability ``group_prob``) that switches all its constituents on
    together, so that triples and quadruples occur often enough to be learnable.  The
    ``additive_only`` control keeps exactly the same firing (same co-occurrence statistics) and
    drops the interaction terms, so any composition a model finds there is spurious.
    """

    model_config = ConfigDict(extra="forbid")

    d_model: int = Field(64, ge=2)
    n_features: int = Field(256, ge=4)
    n_rows: int = Field(65_536, ge=1)
    # interaction order -> how many interactions of that order (the curriculum raises order 2 -> 4)
    n_interactions: dict[int, int] = Field(default_factory=lambda: {2: 32, 3: 16, 4: 8})
    additive_only: bool = False
    zipf_exponent: float = Field(1.0, ge=0.0)
    mean_active: float = Field(6.0, gt=0.0)  # expected independent firings per token
    max_prob: float = Field(0.5, gt=0.0, le=1.0)  # cap on a single feature's firing probability
    group_prob: float = Field(0.02, ge=0.0, le=1.0)  # per-group co-firing event probability
    magnitude: tuple[float, float] = (0.5, 1.5)  # a_i ~ Uniform(lo, hi) when feature i fires
    interaction_scale: tuple[float, float] = (
        0.5,
        1.5,
    )  # b_c ~ Uniform(lo, hi), fixed per interaction
    noise_std: float = Field(0.01, ge=0.0)
    # "direction": each group in n_interactions adds its own fixed direction u_c (a TopK with spare
    # latents can learn it as a conjunction latent).  "bilinear": a `composing_fraction` of the
    # features compose (in a random set of slots of two features adjacent in firing rate, one at
    # random); every pair of composing features that fires together adds a_i a_j B(v_i, v_j), B a
    # shared rank-`bilinear_rank` bilinear map, so interacting pairs outnumber any dictionary's
    # spare latents.  `n_pairs` interacting pairs (both composing) and as many co-firing-only twins
    # (their slot partners: non-composing, matched firing rates) also fire together with probability
    # `group_prob`: the labelled pairs of the pair scores.
    interaction: Literal["direction", "bilinear"] = "direction"
    bilinear_rank: int = Field(8, ge=1)
    composing_fraction: float = Field(0.25, gt=0.0, le=0.5)
    n_pairs: int = Field(
        32, ge=1, description="bilinear: labelled interacting pairs (and as many twins)"
    )
    interaction_norm: float = Field(
        0.3, ge=0.0, description="bilinear: mean ‖B(v_i, v_j)‖ over composing pairs"
    )
    context: int = Field(128, ge=1)  # rows per synthetic "sequence" (seq_id / pos columns)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    hook: str = "synthetic.hook_x"

    @model_validator(mode="after")
    def _pairs_fit(self) -> GroundTruthConfig:
        if self.interaction == "bilinear" and 2 * self.n_pairs > round(
            self.composing_fraction * self.n_features
        ):
            raise ValueError(
                f"n_pairs {self.n_pairs} needs {2 * self.n_pairs} composing features, more than "
                "composing_fraction * n_features; lower n_pairs or raise composing_fraction"
            )
        return self

    @field_validator("hook")
    @classmethod
    def _hook_is_one_store_name(cls, v: str) -> str:
        # The hook names an array inside the store: `..` or `/` would reach outside it.
        if not v or "/" in v or "\\" in v or any(p in ("", "..") for p in v.split(".")):
            raise ValueError(
                f"hook {v!r} must be a dotted name like synthetic.hook_x (no '..', no '/')"
            )
        return v

    @field_validator("n_interactions")
    @classmethod
    def _orders_valid(cls, v: dict[int, int]) -> dict[int, int]:
        for order, count in v.items():
            if order < 2:
                raise ValueError(f"interaction order must be >= 2, got {order}")
            if count < 0:
                raise ValueError(f"interaction count must be >= 0, got {count} for order {order}")
        return v

    @field_validator("magnitude", "interaction_scale")
    @classmethod
    def _range_valid(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"range must satisfy 0 <= lo <= hi, got {v}")
        return v
