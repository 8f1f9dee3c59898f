"""What the probe stage records in `stage.json` under `outputs`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ProbeOutputs(BaseModel):
    """The files written (probes.json / .md / .png) and the headline numbers."""

    files: list[str] = Field(default_factory=list)
    headline: dict[str, Any] = Field(default_factory=dict)
