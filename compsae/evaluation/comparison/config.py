"""The evaluate stage's config: which checkpoints are scored on which ground-truth stores."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
