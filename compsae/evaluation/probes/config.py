"""The probe stage's config: task families, probe sizes and the components probed beside SAEs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
