"""Typed configs of the evaluation stages: synthetic ground truth, the method comparison, task
probes."""

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


class EvalRun(BaseModel):
    """One row of the comparison: a checkpoint folder and the ground-truth store it is scored on."""

    model_config = ConfigDict(extra="forbid")

    label: str
    checkpoint: str
    store: str


class EvaluateConfig(BaseModel):
    """The ``evaluate`` stage: score trained checkpoints on ground-truth stores."""

    model_config = ConfigDict(extra="forbid")

    # each checkpoint is scored on the held-out rows of the split it records (its training's)
    runs: list[EvalRun] = Field(default_factory=list)
    max_rows: int = Field(65_536, ge=1)  # rows of the held-out split used for the metrics
    batch_size: int = Field(1024, ge=1)
    pair_selection: str = Field("top", pattern="^(top|threshold)$")
    pair_threshold: float = 0.0  # used when pair_selection == "threshold"
    min_match_cos: float = Field(
        0.5, ge=0.0, le=1.0
    )  # a latent only stands for a true feature above this
    min_pair_support: int = Field(
        5, ge=1, description="co-firing tokens a latent pair needs to be scored"
    )
    min_pair_effect: float = Field(
        0.003,
        ge=0.0,
        description="smallest pair effect (‖Δ‖ / RMS row deviation) ever called composing",
    )
    device: str = "cpu"


Family = Literal["arithmetic", "boolean", "grammar"]


class ProbeConfig(BaseModel):
    """The ``probe`` stage: the harvested LM's behaviour on the task families, then k-sparse probes
    of their variables on every trained SAE, PCA / NMF components and raw residual channels, and
    the conjunction test for CompSAE models (docs/evaluation.md section 2)."""

    model_config = ConfigDict(extra="forbid")

    n_items: int = Field(400, ge=20, description="examples per family")
    families: list[Family] = Field(
        default_factory=lambda: ["arithmetic", "boolean", "grammar"], min_length=1
    )
    ks: list[int] = Field(default_factory=lambda: [1, 2, 5], min_length=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # items, train/test split, PCA / NMF and the probes
    batch_size: int = Field(32, ge=1)  # prompts per LM forward
    pca_components: int = Field(64, ge=1)
    nmf_components: int = Field(64, ge=1)
    fit_rows: int = Field(
        8192, ge=16, description="training-split store rows PCA / NMF are fitted on"
    )
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    pair_features: int = Field(
        256,
        ge=0,
        description="pairwise CompSAEs are also probed as '<model>+pairs': their codes plus the "
        "pair-term norms z_i z_j ‖R_ij‖ of this many strongest co-firing pairs (0: off)",
    )
    # answer tasks (result, truth value): "auto" probes them only for families the LM solves
    # significantly above chance (one-sided binomial test at `lm_alpha`)
    answer_probes: Literal["auto", "always", "never"] = "auto"
    lm_alpha: float = Field(0.01, gt=0.0, lt=1.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("ks")
    @classmethod
    def _ks_valid(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError(f"every k must be >= 1, got {v}")
        return sorted(set(v))

    @field_validator("families")
    @classmethod
    def _families_unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))
