"""What the data stage (a harvest, or the ground-truth writer) hands on in `stage.json`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class HarvestOutputs(BaseModel):
    """The store every later stage reads: where it is, its hooks (name -> width) and the digest of
    its manifest (what later stages' hashes depend on)."""

    # the ground-truth writer adds a summary of what it planted
    model_config = ConfigDict(extra="allow")

    store: str
    hooks: dict[str, int]
    digest: str
    n_rows: int | None = None
    dtype: str | None = None
