"""What the evaluate stage records in `stage.json` under `outputs`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class EvaluateOutputs(BaseModel):
    """One comparison row per checkpoint, and the files written (comparison.json / .md)."""

    rows: list[dict[str, Any]] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)
