"""The byte format of a store: storage dtypes, and the encoding of one shard file.

An uncompressed activation shard is one file, `acts/<hook>/c/<shard>/0`, laid out as Zarr v3's
sharding codec writes it: each chunk's little-endian bytes then (with `checksum`) its crc32c, then
the index of (offset, nbytes) pairs, one per chunk, then the index's crc32c.  `encode_shard` and
`decode_chunk` are the two directions of that layout, side by side, so they cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import crc32c
import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import BytesCodec, ZstdCodec

from compsae.errors import StoreCorruptError, UserError
from compsae.store.crc import crc32c_concat
from compsae.store.layout import StoreLayout

# Format 2 added checksums bound to their place (store id, array, chunk index) and a digest of all
# metadata; stores of format 1 are still read, with the checks format 1 had.
FORMAT = "compsae-store/2"
LEGACY_FORMAT = "compsae-store/1"
READABLE_FORMATS = (LEGACY_FORMAT, FORMAT)
FLOAT16_MAX = 65504.0
EMPTY = np.uint64(2**64 - 1)  # sharding index entry of a chunk never written
LOCK_NAME = ".compsae.lock"
SIDE_ARRAYS = (
    ("tokens", "<i4"),
    ("seq_id", "<i8"),
    ("pos", "<i4"),
)  # (name, dtype): one value per row


def bound_crc(data: Any, store_id: str, name: str, index: int) -> int:
    """crc32c of `data` bound to its place: the crc of (store id, array name, chunk index, data).

    A chunk moved to another index, another array or another store fails this check as loudly as
    a flipped bit (the chunks' own crc32c, which Zarr keeps, covers only their bytes)."""
    return crc32c.crc32c(data, _place_crc(store_id, name, index))


def _place_crc(store_id: str, name: str, index: int) -> int:
    return crc32c.crc32c(f"{store_id}/{name}/{index}".encode())


def bind_crc(crc: int, nbytes: int, store_id: str, name: str, index: int) -> int:
    """`bound_crc` of `nbytes` bytes whose own crc32c is `crc`, without reading them again."""
    return crc32c_concat(_place_crc(store_id, name, index), crc, nbytes)


def chunk_table(hook: str) -> str:
    """Array of a hook's bound chunk checksums, `[n_shards, chunks_per_shard]` uint32."""
    return f"progress/chunk_crc/{hook}"


SIDE_TABLE = "progress/side_crc"  # bound checksums of the side arrays, [n_shards, 3] uint32


def shard_file(hook: str, shard: int) -> str:
    """Path of a hook's shard file, relative to the store root."""
    return f"acts/{hook}/c/{shard}/0"


# ---------------------------------------------------------------------------------------------
# dtype conversion: numpy has no bfloat16, so bfloat16 is kept as its raw uint16 bits.


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a storage dtype is kept in (bfloat16 as its uint16 bits)."""
    return np.dtype({"float16": "<f2", "bfloat16": "<u2", "float32": "<f4"}[dtype])


def check_peak(peak: float, dtype: str, hook: str) -> None:
    """Refuse activations whose largest magnitude `peak` is NaN/inf, or beyond float16's range."""
    if not math.isfinite(peak):
        raise UserError(
            f"activations of {hook} contain NaN or inf; the model itself is unstable here"
        )
    if dtype == "float16" and peak > FLOAT16_MAX:
        raise UserError(
            f"activations of {hook} reach {peak:.4g}, beyond float16's range (65504); "
            "set harvest.dtype=bfloat16 or float32"
        )


def to_storage(x: np.ndarray, dtype: str, hook: str) -> np.ndarray:
    """Convert float activations `x: [rows, d]` to the storage dtype, refusing float16 overflow.

    `x` already in the storage dtype (float16, bfloat16 bits as uint16, float32; e.g. cast on the
    GPU by the harvest) is only checked for NaN/inf, which in float16 also catches an overflowed
    cast."""
    x = np.asarray(x)
    stored = storage_dtype(dtype)
    if x.dtype == stored and dtype != "float32":
        # exponent bits all ones = inf or NaN; max over (bits & ~sign) checks that in one pass
        magnitude = int(np.bitwise_and(x.view(np.uint16), np.uint16(0x7FFF)).max(initial=0))
        if dtype == "float16" and magnitude >= 0x7C00:
            raise UserError(
                f"activations of {hook} are inf or NaN in float16 (beyond its range of 65504, or "
                "the "
                "model is unstable); set harvest.dtype=bfloat16 or float32"
            )
        check_peak(0.0 if magnitude < 0x7F80 else math.nan, dtype, hook)
        return x
    x = np.asarray(x, dtype=np.float32)
    if x.size:  # max and min, not abs().max(): no temporary array; NaN propagates through both
        hi, lo = float(x.max()), float(x.min())
        check_peak(
            max(hi, -lo) if math.isfinite(hi) and math.isfinite(lo) else math.nan, dtype, hook
        )
    if dtype == "float16":
        return x.astype(np.float16)
    if dtype == "bfloat16":
        bits = x.view(np.uint32)
        # round to nearest even on the 16 dropped bits
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (rounded >> np.uint32(16)).astype(np.uint16)
    return x


def from_storage(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values back to float32."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return raw.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# shard files


def encode_shard(
    stored: np.ndarray, layout: StoreLayout, chunk_crcs: list[int] | None = None
) -> list[Any]:
    """The buffers of one uncompressed shard file holding `stored: [rows, d]` (storage dtype).

    A last chunk shorter than `chunk_rows` is padded with the fill value (0); chunks wholly past
    the end of the array stay empty (index entry EMPTY), as Zarr leaves them.  `chunk_crcs`: the
    crc32c of each chunk's rows when the caller has them (whole chunks then are not read again)."""
    chunk_rows, n_inner = layout.chunk_rows, layout.chunks_per_shard
    pieces: list[Any] = []
    index = np.full((n_inner, 2), EMPTY, dtype="<u8")
    offset = 0
    for inner in range(n_inner):
        lo = inner * chunk_rows
        if lo >= len(stored):
            break
        chunk = stored[lo : lo + chunk_rows]
        crc = chunk_crcs[inner] if chunk_crcs is not None else None
        if len(chunk) < chunk_rows:
            chunk = np.concatenate(
                [chunk, np.zeros((chunk_rows - len(chunk), chunk.shape[1]), chunk.dtype)]
            )
            crc = None  # the padding is part of the chunk's bytes
        pieces.append(memoryview(chunk).cast("B"))
        nbytes = chunk.nbytes
        if layout.checksum:
            pieces.append((crc32c.crc32c(chunk) if crc is None else crc).to_bytes(4, "little"))
            nbytes += 4
        index[inner] = offset, nbytes
        offset += nbytes
    index_bytes = index.tobytes()
    return [*pieces, index_bytes, crc32c.crc32c(index_bytes).to_bytes(4, "little")]


def decode_chunk(
    buf: Any, inner: int, layout: StoreLayout, d: int, where: str, chunk: int, own_crc: bool = True
) -> memoryview | None:
    """The data bytes of chunk `inner` (`chunk_rows * d` values, padding included) of a shard file
    `buf`, its own crc32c checked; None when the chunk was never written.  `where` names the store,
    hook and shard in the error, `chunk` is the chunk's index in the whole array.  `own_crc=False`
    skips the chunk's own crc32c (the caller checks a bound one)."""
    n_inner = layout.chunks_per_shard
    index_bytes = n_inner * 16
    if len(buf) < index_bytes + 4:
        raise StoreCorruptError(f"{where}: shard file is truncated ({len(buf)} bytes)")
    index_raw = buf[len(buf) - index_bytes - 4 : len(buf) - 4]
    if crc32c.crc32c(index_raw) != int.from_bytes(buf[len(buf) - 4 :], "little"):
        raise StoreCorruptError(
            f"{where}: shard index checksum mismatch; run `compsae verify` and re-harvest"
        )
    offset, nbytes = np.frombuffer(index_raw, dtype="<u8").reshape(n_inner, 2)[inner]
    if offset == EMPTY:
        return None
    payload = layout.chunk_rows * d * storage_dtype(layout.dtype).itemsize
    expect = payload + (4 if layout.checksum else 0)
    if nbytes != expect or offset + nbytes > len(buf) - index_bytes - 4:
        raise StoreCorruptError(f"{where}: chunk {chunk} has a bad index entry")
    data = memoryview(buf)[offset : offset + payload]
    if layout.checksum and own_crc:
        stored_crc = int.from_bytes(buf[offset + payload : offset + payload + 4], "little")
        if crc32c.crc32c(data) != stored_crc:
            raise StoreCorruptError(
                f"{where}: chunk {chunk} fails its checksum (corrupt bytes); run `compsae verify` "
                "and re-harvest"
            )
    return data


def _plain_codec(arr: zarr.Array) -> Zstd | None | bool:
    """`arr`'s chunk codecs as compsae writes them itself: False when they are not little-endian
    bytes optionally followed by zstd, else the zstd codec (None: plain bytes)."""
    codecs = arr.metadata.codecs
    if (
        not codecs
        or not isinstance(codecs[0], BytesCodec)
        or getattr(codecs[0].endian, "value", None) not in (None, "little")
    ):
        return False
    if len(codecs) == 1:
        return None
    if len(codecs) == 2 and isinstance(codecs[1], ZstdCodec):
        return Zstd(level=codecs[1].level, checksum=codecs[1].checksum)
    return False


def plain_encoder(arr: zarr.Array) -> Callable[[bytes], bytes] | None:
    """How to encode a chunk of `arr` when its codecs are little-endian bytes, optionally followed
    by zstd (what a store gives its small arrays); None for anything else."""
    codec = _plain_codec(arr)
    return None if codec is False else bytes if codec is None else codec.encode


def read_row_chunks(arr: zarr.Array, folder: str, stop: int, start: int = 0) -> np.ndarray | None:
    """Rows [start, stop) of a local array chunked along its first axis only, read straight from
    its chunk files in `folder` (a missing chunk is the fill value); None when its codecs are not
    `plain_encoder`'s.  Zarr reads each chunk through its event loop, milliseconds apiece: a
    store's per-shard arrays (one chunk per shard) would cost seconds per thousand shards."""
    codec = _plain_codec(arr)
    shape = tuple(arr.metadata.chunk_grid.chunk_shape)
    if codec is False or tuple(shape[1:]) != tuple(arr.shape[1:]):
        return None
    dtype = np.dtype(arr.dtype).newbyteorder("<")
    stop = min(stop, arr.shape[0])
    start = min(start, stop)
    c0, c1 = start // shape[0], -(-stop // shape[0])
    out = np.full(((c1 - c0) * shape[0], *shape[1:]), arr.metadata.fill_value, dtype=dtype)
    tail = (0,) * (len(shape) - 1)
    for c in range(c0, c1):
        try:
            with open(f"{folder}/{arr.metadata.encode_chunk_key((c, *tail))}", "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            continue
        out[(c - c0) * shape[0] : (c - c0 + 1) * shape[0]] = np.frombuffer(
            raw if codec is None else codec.decode(raw), dtype=dtype
        ).reshape(shape)
    off = c0 * shape[0]
    return out[start - off : stop - off].astype(arr.dtype, copy=False)
