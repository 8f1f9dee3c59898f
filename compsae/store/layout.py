"""How a store lays activations out on disk: dtype, chunk and shard sizes, compressor."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

StorageDtype = Literal["float16", "bfloat16", "float32"]

# Defaults chosen by measurement on this machine class (2 cores, local SSD), d_model 512:
# - chunk_rows 1024: a 1 MiB float16 chunk is the unit the loader reads and shuffles; 16+ chunks
#   in the mixing buffer give a batch rows from 128+ sequences, and a whole-chunk read is a single
#   sequential memcpy from the page cache.
# - shard_rows 16384: a 16 MiB shard file (tens of MB for wider models) keeps the file count low
#   (10M tokens = ~600 files per hook) and is also the unit of resumability of a harvest.
# - compressor none: real residual activations compress 1.07x (float16, zstd+shuffle) to 1.32x
#   (bfloat16), which does not repay the CPU; raw chunks can be memory-mapped by the loader.
#   zstd is there for archiving.
DEFAULT_CHUNK_ROWS = 1024
DEFAULT_SHARD_ROWS = 16384


class StoreLayout(BaseModel):
    """Chunking and encoding of every activation array in a store."""

    model_config = ConfigDict(extra="forbid")

    dtype: StorageDtype = "float16"
    chunk_rows: int = Field(DEFAULT_CHUNK_ROWS, ge=1, description="rows per chunk (unit of reads)")
    shard_rows: int = Field(DEFAULT_SHARD_ROWS, ge=1, description="rows per shard file")
    compressor: Literal["none", "zstd"] = "none"
    checksum: bool = Field(True, description="crc32c on every chunk, checked on every read")

    @model_validator(mode="after")
    def _shard_is_whole_chunks(self) -> StoreLayout:
        if self.shard_rows % self.chunk_rows:
            raise ValueError(
                f"shard_rows ({self.shard_rows}) must be a multiple of chunk_rows "
                f"({self.chunk_rows})"
            )
        return self

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows
