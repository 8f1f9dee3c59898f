"""What the analyze stage records in `stage.json` under `outputs`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class AnalyzeOutputs(BaseModel):
    """The files written (role -> path relative to the stage folder; `browsers`: model -> page) and
    the headline numbers."""

    files: dict[str, Any] = Field(default_factory=dict)
    n_tokens: int | None = None
    hook: str | None = None
    headline: dict[str, Any] = Field(default_factory=dict)

    @property
    def browsers(self) -> dict[str, str]:
        """Model name -> its feature-browser page (relative path), where one was written."""
        return dict(self.files.get("browsers") or {})
