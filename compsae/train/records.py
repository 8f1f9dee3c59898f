"""What the train stage hands on: the metadata of every checkpoint (`config.json`, and the same
JSON inside `model.safetensors`) and the stage's outputs in `stage.json`.  Later stages read
both through these models, never by key."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from compsae.store.split import DEFAULT_SPLIT_SEED, HeldOutSplit
from compsae.train.config import ModelConfig, legacy_model_config


class Normalization(BaseModel):
    """The loader's normalisation: the model saw `x * scale` (x in store units) in training."""

    scale: float


class CheckpointMeta(BaseModel):
    """A checkpoint's metadata.  `split` is the held-out split training used; None for a model
    trained elsewhere (imported), which trained on no row of any store here."""

    # imported checkpoints carry their provenance ("imported") next to these fields
    model_config = ConfigDict(extra="allow")

    type: str
    model: ModelConfig
    d_in: int
    hook: str = ""
    normalization: Normalization | None = None
    split: HeldOutSplit | None = None
    step: int = 0
    tokens_seen: int | None = 0
    finished: bool = False
    config_hash: str | None = None
    store_manifest_hash: str | None = None
    name: str = ""
    train: dict[str, Any] | None = None  # the TrainConfig it was trained with

    @classmethod
    def start(cls, model: ModelConfig, d_in: int, **fields: Any) -> CheckpointMeta:
        """The metadata of a model about to be trained (step 0): its config, input width and any
        other fixed field (`hook`, `config_hash`, `normalization`, ...)."""
        return cls(type=model.type, model=model, d_in=d_in, **fields)

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        # Checkpoints written before the split was recorded held out train.heldout_fraction with
        # the split's default seed: training never passed another.
        if isinstance(data, dict) and data.get("split") is None:
            fraction = (data.get("train") or {}).get("heldout_fraction")
            if fraction is not None:
                data = {**data, "split": {"fraction": fraction, "seed": DEFAULT_SPLIT_SEED}}
        # Before the per-kind configs every kind carried every setting: drop the ones it lacks.
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            data = {**data, "model": legacy_model_config(data["model"])}
        return data

    @property
    def scale(self) -> float:
        """The factor applied to store rows before the model sees them."""
        return self.normalization.scale if self.normalization is not None else 1.0


class TrainedModelRecord(BaseModel):
    """One model of the train stage's outputs."""

    path: str
    type: str
    split: HeldOutSplit | None = None
    step: int | None = None
    tokens_seen: int | None = None
    finished: bool | None = None
    final: dict[str, Any] | None = None  # the last logged training metrics
    heldout: dict[str, Any] | None = None  # FVU / MSE / L0 on held-out batches
    imported: dict[str, Any] | None = None  # {format, source} of an SAE trained elsewhere
    model_digest: str | None = (
        None  # sha256 of model.safetensors: what `compsae verify` checks the file against
    )


class TrainOutputs(BaseModel):
    """What `stage.json` of the train stage records under `outputs`."""

    store: str
    hook: str
    heldout_fraction: float
    store_manifest_hash: str
    models: dict[str, TrainedModelRecord]
    curves: str | None = None  # the training-curves figure, in the stage folder
    digest: str
