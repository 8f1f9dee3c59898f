"""What the evaluate and probe stages record in `stage.json` under `outputs`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class EvaluateOutputs(BaseModel):
    """One comparison row per checkpoint, and the files written (comparison.json / .md)."""

    rows: list[dict[str, Any]] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)


class ProbeOutputs(BaseModel):
    """The files written (probes.json / .md / .png) and the headline numbers."""

    files: list[str] = Field(default_factory=list)
    headline: dict[str, Any] = Field(default_factory=dict)
