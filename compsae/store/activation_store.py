"""`ActivationStore`: one Zarr v3 group of per-token activations, written shard by shard.

Layout (see docs/architecture.md):
    acts/<hook>            [n_rows, d_model]  chunked along tokens, sharded, raw little-endian + crc32c
    tokens, seq_id, pos    [n_rows]           the token behind every row, its sequence and position
    progress/shard_done    [n_shards]         1 once a shard is completely written (resume point)
    progress/shard_crc     [n_shards]         crc32c of everything written for that shard
    progress/stats/<hook>  [n_shards, 2d+2]   per-shard count, mean, M2 and norm sum (float64)
The manifest lives in the group attributes.  Rows are in harvest order; the loader shuffles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import crc32c
import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from numcodecs import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import FsspecStore, LocalStore

from compsae.errors import StoreCorruptError, UserError
from compsae.store.layout import StoreLayout

FORMAT = "compsae-store/1"
FLOAT16_MAX = 65504.0
_EMPTY = np.uint64(2**64 - 1)  # sharding index entry of a chunk never written
_LOCK_NAME = ".compsae.lock"
_IOV_MAX = 1024  # buffers one writev call may take (Linux)


def _zarr_store(url: str, read_only: bool) -> LocalStore | FsspecStore:
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return LocalStore(path, read_only=read_only)
    return FsspecStore.from_url(url, read_only=read_only)


def store_exists(url: str) -> bool:
    """True when a Zarr group (any) is at `url`."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(f"{path.rstrip('/')}/zarr.json")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """Stable short digest of a manifest (what downstream stage hashes depend on)."""
    keep = {k: v for k, v in manifest.items() if k not in ("stats", "shard_checksums", "created_at")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# dtype conversion: numpy has no bfloat16, so bfloat16 is kept as its raw uint16 bits.


def check_peak(peak: float, dtype: str, hook: str) -> None:
    """Refuse activations whose largest magnitude `peak` is NaN/inf, or beyond float16's range."""
    if not math.isfinite(peak):
        raise UserError(f"activations of {hook} contain NaN or inf; the model itself is unstable here")
    if dtype == "float16" and peak > FLOAT16_MAX:
        raise UserError(
            f"activations of {hook} reach {peak:.4g}, beyond float16's range (65504); "
            "set harvest.dtype=bfloat16 or float32"
        )


def to_storage(x: np.ndarray, dtype: str, hook: str) -> np.ndarray:
    """Convert float activations `x: [rows, d]` to the storage dtype, refusing float16 overflow.

    `x` already in the storage dtype (float16, bfloat16 bits as uint16, float32; e.g. cast on the
    GPU by the harvest) is only checked for NaN/inf, which in float16 also catches an overflowed cast."""
    x = np.asarray(x)
    stored = _numpy_storage_dtype(dtype)
    if x.dtype == stored and dtype != "float32":
        # exponent bits all ones = inf or NaN; max over (bits & ~sign) checks that in one pass
        magnitude = int(np.bitwise_and(x.view(np.uint16), np.uint16(0x7FFF)).max(initial=0))
        if dtype == "float16" and magnitude >= 0x7C00:
            raise UserError(f"activations of {hook} are inf or NaN in float16 (beyond its range of 65504, or the "
                            "model is unstable); set harvest.dtype=bfloat16 or float32")
        check_peak(0.0 if magnitude < 0x7F80 else math.nan, dtype, hook)
        return x
    x = np.asarray(x, dtype=np.float32)
    if x.size:  # max and min, not abs().max(): no temporary array; NaN propagates through both
        hi, lo = float(x.max()), float(x.min())
        check_peak(max(hi, -lo) if math.isfinite(hi) and math.isfinite(lo) else math.nan, dtype, hook)
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


def _numpy_storage_dtype(dtype: str) -> np.dtype:
    return np.dtype({"float16": "<f2", "bfloat16": "<u2", "float32": "<f4"}[dtype])


def rounding_error(x: np.ndarray, dtype: str) -> float:
    """Relative L2 error ‖x − q(x)‖ / ‖x‖ of storing `x` in `dtype`."""
    x = np.asarray(x, dtype=np.float64)
    q = from_storage(to_storage(x.astype(np.float32), dtype, "sample"), dtype).astype(np.float64)
    denom = float(np.linalg.norm(x)) or 1.0
    return float(np.linalg.norm(x - q) / denom)


def merge_moments(counts: np.ndarray, means: np.ndarray, m2s: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Merge per-shard (count, mean [d], M2 [d]) into totals with Chan et al.'s parallel formula."""
    n_tot, mean_tot, m2_tot = 0, np.zeros(means.shape[1]), np.zeros(means.shape[1])
    for n, mean, m2 in zip(counts, means, m2s, strict=True):
        if n == 0:
            continue
        delta = mean - mean_tot
        new_n = n_tot + n
        mean_tot = mean_tot + delta * (n / new_n)
        m2_tot = m2_tot + m2 + delta**2 * (n_tot * n / new_n)
        n_tot = int(new_n)
    return n_tot, mean_tot, m2_tot


# ---------------------------------------------------------------------------------------------


class ActivationStore:
    """A Zarr v3 activation store: create or open it, write shards, read chunks fast."""

    def __init__(self, url: str, group: zarr.Group, read_only: bool) -> None:
        self.url = url.rstrip("/")
        self.group = group
        self.read_only = read_only
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._shard_cache: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._columns: dict[str, np.ndarray] = {}
        self._arrays: dict[str, zarr.Array] = {}
        self._lock_handle: Any = None
        self.manifest: dict[str, Any] = dict(group.attrs.get("manifest", {}))
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{url} is not a compsae store (no compsae manifest); harvest into it first")
        self.layout = StoreLayout(**self.manifest["layout"])

    # -- creation -------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        url: str,
        hooks: dict[str, int],
        n_rows: int,
        layout: StoreLayout,
        manifest: dict[str, Any],
        overwrite: bool = False,
    ) -> ActivationStore:
        """Create an empty store for `n_rows` rows of every hook in `hooks` (name -> d_model)."""
        if store_exists(url) and not overwrite:
            raise UserError(f"a store already exists at {url}; pass --force to overwrite it")
        if overwrite and store_exists(url):
            _wipe(url)
        n_shards = max(1, -(-n_rows // layout.shard_rows))
        manifest = {
            **manifest,
            "format": FORMAT,
            "hooks": dict(hooks),
            "layout": layout.model_dump(),
            "dtype": layout.dtype,
            "n_rows": int(n_rows),
            "n_shards": n_shards,
            "complete": False,
        }
        # mode "a", not "w": "w" clears the folder, lock file included, while a writer holds it.
        # The manifest goes in first, marked unfinished, so a store killed while being laid out
        # is recognised (and laid out again) instead of refused as "not a compsae store".
        group = zarr.open_group(_zarr_store(url, read_only=False), mode="a", zarr_format=3)
        group.attrs["manifest"] = {**manifest, "laid_out": False}
        inner = [Crc32cCodec()] if layout.checksum else []
        if layout.compressor == "zstd":
            inner = [ZstdCodec(level=3), *inner]
        for hook, d_model in hooks.items():
            group.create_array(
                f"acts/{hook}",
                shape=(n_rows, d_model),
                dtype=_numpy_storage_dtype(layout.dtype),
                chunks=(layout.chunk_rows, d_model),
                shards=(layout.shard_rows, d_model),
                compressors=inner,
                fill_value=0,
                config={"write_empty_chunks": True},
                attributes={"compsae_dtype": layout.dtype, "hook": hook},
            )
            group.create_array(
                f"progress/stats/{hook}",
                shape=(n_shards, 2 * d_model + 2),
                dtype="<f8",
                chunks=(1, 2 * d_model + 2),
                fill_value=0,
            )
        for name, dt in (("tokens", "<i4"), ("seq_id", "<i8"), ("pos", "<i4")):
            group.create_array(name, shape=(n_rows,), dtype=dt, chunks=(layout.shard_rows,), fill_value=0)
        group.create_array("progress/shard_done", shape=(n_shards,), dtype="u1", chunks=(1,), fill_value=0,
                           config={"write_empty_chunks": True})
        group.create_array("progress/shard_crc", shape=(n_shards,), dtype="<u4", chunks=(1,), fill_value=0,
                           config={"write_empty_chunks": True})
        group.attrs["manifest"] = {**manifest, "laid_out": True}
        return cls(url, group, read_only=False)

    @classmethod
    def open(cls, url: str, mode: str = "r") -> ActivationStore:
        """Open an existing store (`mode` "r" to read, "r+" to continue writing)."""
        if not store_exists(url):
            raise UserError(f"no store at {url}; run `compsae harvest` first or check the path")
        read_only = mode == "r"
        group = zarr.open_group(_zarr_store(url, read_only=read_only), mode=mode, zarr_format=3)
        return cls(url, group, read_only=read_only)

    @classmethod
    def create_or_resume(
        cls,
        url: str,
        hooks: dict[str, int],
        n_rows: int,
        layout: StoreLayout,
        manifest: dict[str, Any],
        force: bool = False,
    ) -> ActivationStore:
        """Open the store at `url` to continue it when it was made with the same config hash,
        else create it.  A store of another config is refused unless `force`."""
        if store_exists(url):
            try:
                existing = cls.open(url, mode="r+")
            except UserError:
                existing = None
            if existing is not None and existing.manifest.get("laid_out") is False:
                return cls.create(url, hooks, n_rows, layout, manifest, overwrite=True)  # killed mid-layout
            if existing is not None and existing.manifest.get("config_hash") == manifest.get("config_hash"):
                if force:
                    return cls.create(url, hooks, n_rows, layout, manifest, overwrite=True)
                return existing
            if not force:
                had = existing.manifest.get("config_hash") if existing else "not a compsae store"
                raise UserError(
                    f"the store at {url} was made with a different config ({had} != "
                    f"{manifest.get('config_hash')}); pass --force to overwrite it or choose another store"
                )
            return cls.create(url, hooks, n_rows, layout, manifest, overwrite=True)
        return cls.create(url, hooks, n_rows, layout, manifest)

    # -- properties ---------------------------------------------------------------------------------

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def n_shards(self) -> int:
        return int(self.manifest["n_shards"])

    @property
    def chunk_rows(self) -> int:
        return self.layout.chunk_rows

    @property
    def shard_rows(self) -> int:
        return self.layout.shard_rows

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def d_model(self, hook: str) -> int:
        return int(self.manifest["hooks"][self._check_hook(hook)])

    def _check_hook(self, hook: str) -> str:
        if hook not in self.manifest["hooks"]:
            raise UserError(f"the store at {self.url} has no hook {hook!r}; it holds {', '.join(self.hooks)}")
        return hook

    def zarr_array(self, hook: str) -> zarr.Array:
        """The raw Zarr array of a hook (storage dtype; bfloat16 appears as uint16 bits)."""
        return self.group[f"acts/{self._check_hook(hook)}"]

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Row range [start, stop) of a shard."""
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.n_rows)

    # -- writing --------------------------------------------------------------------------------

    def lock(self, what: str = "harvest") -> Any:
        """Hold the store's writer lock; a second writer is refused with a clear error."""
        return writer_lock(self.url, what)

    def done_shards(self) -> set[int]:
        """Indices of the shards completely written."""
        done = self.group["progress/shard_done"][:]
        return {int(i) for i in np.flatnonzero(done == 1)}

    def write_shard(
        self,
        shard: int,
        acts: dict[str, np.ndarray],
        tokens: np.ndarray,
        seq_id: np.ndarray,
        pos: np.ndarray,
        moments: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write every row of one shard (all hooks), its statistics, and then its completion mark.

        `acts[hook]: [rows, d_model]` float (any float dtype, converted and range-checked here; or
        already in the storage dtype, then only checked for NaN/inf).  `moments[hook]`: the shard's
        `shard_moments` of the stored values when the caller has them (the harvest computes them
        on the GPU); computed here otherwise.  The mark is written last, so a shard interrupted
        half-way is simply written again."""
        start, stop = self.shard_range(shard)
        rows = stop - start
        digest = 0
        small: list[tuple[str, tuple[int, ...], np.ndarray]] = []  # (array, chunk, values): written after the acts
        for hook in self.hooks:
            x = np.asarray(acts[hook])
            if x.shape != (rows, self.d_model(hook)):
                raise ValueError(f"shard {shard} of {hook}: expected {(rows, self.d_model(hook))}, got {x.shape}")
            stored = np.ascontiguousarray(to_storage(x, self.layout.dtype, hook),
                                          dtype=_numpy_storage_dtype(self.layout.dtype))
            if self.layout.compressor == "none":
                self._write_shard_file(hook, shard, stored)
            else:
                self._array(f"acts/{hook}")[start:stop] = stored
            digest = crc32c.crc32c(stored, digest)
            stats = moments[hook] if moments is not None else shard_moments(
                stored if self.layout.dtype != "bfloat16" else from_storage(stored, "bfloat16"))
            small.append((f"progress/stats/{hook}", (shard, 0), np.asarray(stats, dtype="<f8")[None, :]))
        for name, col, dt in (("tokens", tokens, "<i4"), ("seq_id", seq_id, "<i8"), ("pos", pos, "<i4")):
            col = np.ascontiguousarray(col, dtype=dt)
            if col.shape != (rows,):
                raise ValueError(f"shard {shard}: {name} has shape {col.shape}, expected ({rows},)")
            small.append((name, (shard,), col))
            digest = crc32c.crc32c(col, digest)
        small.append(("progress/shard_crc", (shard,), np.array([digest], dtype="<u4")))
        self._put_chunks(small)
        self._put_chunks([("progress/shard_done", (shard,), np.array([1], dtype="u1"))])

    def _array(self, name: str) -> zarr.Array:
        """A cached handle on one array of the group (a group lookup reads its metadata again)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def _put_chunks(self, items: list[tuple[str, tuple[int, ...], np.ndarray]]) -> None:
        """Write each `(array name, chunk index, values)` as that whole chunk of the array.

        The small per-shard arrays (one chunk per shard) are encoded here and written as files:
        through Zarr each write costs milliseconds of event-loop round trips, as much as the
        shard's activations.  An array whose codecs are not plain bytes [+ zstd], or a write that
        does not cover its chunk, goes through Zarr."""
        files: dict[str, bytes] = {}
        for name, chunk, values in items:
            arr = self._array(name)
            shape = arr.metadata.chunk_grid.chunk_shape
            selection = tuple(slice(c * n, c * n + v) for c, n, v in zip(chunk, shape, values.shape, strict=True))
            whole = all(sel.start == c * n and (v == n or sel.stop == size)
                        for sel, c, n, v, size in zip(selection, chunk, shape, values.shape, arr.shape, strict=True))
            encode = _plain_encoder(arr) if whole else None
            if encode is None:
                arr[selection] = values
                continue
            data = values
            if values.shape != shape:  # the array's last chunk: padded with the fill value, as Zarr does
                data = np.full(shape, arr.metadata.fill_value, dtype=values.dtype)
                data[tuple(slice(0, v) for v in values.shape)] = values
            files[f"{self.path}/{name}/{arr.metadata.encode_chunk_key(chunk)}"] = encode(
                np.ascontiguousarray(data, dtype=np.dtype(arr.dtype).newbyteorder("<")).tobytes())
        if not files:
            return
        if not self.is_local:
            self.fs.pipe(files)  # object stores upload them concurrently
            return
        for path, data in files.items():
            _write_file(path, [data])

    def _write_shard_file(self, hook: str, shard: int, stored: np.ndarray) -> None:
        """Write one uncompressed shard of `hook` as a whole file, encoded as Zarr's sharding codec
        does: each chunk's little-endian bytes then its crc32c, then the index of (offset, nbytes)
        pairs and the index's crc32c.  Chunks wholly past the end of the array stay empty, as Zarr
        leaves them.  Local files are written to a temporary name and renamed (as Zarr does)."""
        chunk_rows, n_inner = self.chunk_rows, self.layout.chunks_per_shard
        pieces: list[Any] = []
        index = np.full((n_inner, 2), _EMPTY, dtype="<u8")
        offset = 0
        for inner in range(n_inner):
            lo = inner * chunk_rows
            if lo >= len(stored):
                break
            chunk = stored[lo:lo + chunk_rows]
            if len(chunk) < chunk_rows:  # the array's last chunk: padded with the fill value
                chunk = np.concatenate([chunk, np.zeros((chunk_rows - len(chunk), chunk.shape[1]), chunk.dtype)])
            pieces.append(memoryview(chunk).cast("B"))
            nbytes = chunk.nbytes
            if self.layout.checksum:
                pieces.append(crc32c.crc32c(chunk).to_bytes(4, "little"))
                nbytes += 4
            index[inner] = offset, nbytes
            offset += nbytes
        index_bytes = index.tobytes()
        pieces += [index_bytes, crc32c.crc32c(index_bytes).to_bytes(4, "little")]
        path = f"{self.path}/acts/{hook}/c/{shard}/0"
        if self.is_local:
            _write_file(path, pieces)
        else:
            self.fs.pipe_file(path, b"".join(pieces))

    def finalize(self, n_rows: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Mark the store complete: shrink it to `n_rows` when the data ran out early, merge the
        per-shard statistics and write the final manifest.  Returns the manifest."""
        if n_rows is not None and n_rows != self.n_rows:
            if n_rows > self.n_rows:
                raise ValueError("finalize cannot grow a store")
            for hook in self.hooks:
                arr = self.group[f"acts/{hook}"]
                arr.resize((n_rows, arr.shape[1]))
            for name in ("tokens", "seq_id", "pos"):
                self.group[name].resize((n_rows,))
            self.manifest["n_rows"] = int(n_rows)
            self.manifest["n_shards"] = max(1, -(-n_rows // self.shard_rows))
            self._arrays.clear()  # cached handles still have the old shape
        missing = sorted(set(range(self.n_shards)) - self.done_shards())
        if missing:
            raise StoreCorruptError(f"store {self.url}: shards {missing[:10]} were never written")
        stats: dict[str, Any] = {}
        for hook in self.hooks:
            stats[hook] = self._merged_stats(hook)
        self.manifest["stats"] = stats
        self.manifest["shard_checksums"] = [int(c) for c in self.group["progress/shard_crc"][: self.n_shards]]
        self.manifest.update(extra or {})
        self.manifest["complete"] = True
        self.group.attrs["manifest"] = self.manifest
        return self.manifest

    def update_manifest(self, **fields: Any) -> None:
        """Record extra manifest fields (e.g. the measured rounding error)."""
        self.manifest.update(fields)
        self.group.attrs["manifest"] = self.manifest

    def _merged_stats(self, hook: str) -> dict[str, Any]:
        d = self.d_model(hook)
        per_shard = self.group[f"progress/stats/{hook}"][: self.n_shards]
        counts = per_shard[:, 0]
        n, mean, m2 = merge_moments(counts, per_shard[:, 1 : 1 + d], per_shard[:, 1 + d : 1 + 2 * d])
        norm_sum = float(per_shard[:, 1 + 2 * d].sum())
        return {
            "count": n,
            "mean": mean.tolist(),
            "var": (m2 / max(n, 1)).tolist(),
            "mean_norm": norm_sum / max(n, 1),
        }

    # -- reading --------------------------------------------------------------------------------

    def stats(self, hook: str) -> dict[str, Any]:
        """Float64 statistics of a hook: count, mean [d], var [d] (population), mean_norm."""
        self._check_hook(hook)
        s = self.manifest.get("stats", {}).get(hook) or self._merged_stats(hook)
        return {"count": s["count"], "mean": np.asarray(s["mean"]), "var": np.asarray(s["var"]),
                "mean_norm": s["mean_norm"]}

    def _column(self, name: str) -> np.ndarray:
        if name not in self._columns:
            self._columns[name] = self.group[name][: self.n_rows]
        return self._columns[name]

    @property
    def tokens(self) -> np.ndarray:
        return self._column("tokens")

    @property
    def seq_id(self) -> np.ndarray:
        return self._column("seq_id")

    @property
    def pos(self) -> np.ndarray:
        return self._column("pos")

    def read_rows(self, hook: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a hook as float32, through the Zarr API."""
        return from_storage(self.zarr_array(hook)[start:stop], self.layout.dtype)

    def read_chunk(self, hook: str, chunk: int) -> np.ndarray:
        """One chunk of a hook as float32 `[rows_in_chunk, d_model]`, checksum verified.

        The fast path reads the shard file's bytes directly (memory-mapped when local): an
        uncompressed Zarr v3 chunk is plain little-endian data followed by its crc32c."""
        raw = self.read_chunk_raw(hook, chunk)
        return from_storage(raw, self.layout.dtype)

    def read_chunk_raw(self, hook: str, chunk: int) -> np.ndarray:
        """One chunk in the storage dtype (a read-only view into the mapped shard when possible)."""
        self._check_hook(hook)
        if not 0 <= chunk < self.n_chunks:
            raise IndexError(f"chunk {chunk} outside 0..{self.n_chunks - 1}")
        start = chunk * self.chunk_rows
        stop = min(start + self.chunk_rows, self.n_rows)
        if self.layout.compressor != "none":
            return self.zarr_array(hook)[start:stop]
        shard, inner = divmod(chunk, self.layout.chunks_per_shard)
        buf = self._shard_bytes(hook, shard)
        d = self.d_model(hook)
        dt = _numpy_storage_dtype(self.layout.dtype)
        n_inner = self.layout.chunks_per_shard
        index_bytes = n_inner * 16
        where = f"store {self.url}, hook {hook}, shard {shard}"
        if len(buf) < index_bytes + 4:
            raise StoreCorruptError(f"{where}: shard file is truncated ({len(buf)} bytes)")
        index_raw = buf[len(buf) - index_bytes - 4 : len(buf) - 4]
        if crc32c.crc32c(index_raw) != int.from_bytes(buf[len(buf) - 4 :], "little"):
            raise StoreCorruptError(f"{where}: shard index checksum mismatch; run `compsae verify` and re-harvest")
        offset, nbytes = np.frombuffer(index_raw, dtype="<u8").reshape(n_inner, 2)[inner]
        if offset == _EMPTY:
            return np.zeros((stop - start, d), dtype=dt)
        payload = self.chunk_rows * d * dt.itemsize
        expect = payload + (4 if self.layout.checksum else 0)
        if nbytes != expect or offset + nbytes > len(buf) - index_bytes - 4:
            raise StoreCorruptError(f"{where}: chunk {chunk} has a bad index entry")
        data = memoryview(buf)[offset : offset + payload]
        if self.layout.checksum:
            stored_crc = int.from_bytes(buf[offset + payload : offset + payload + 4], "little")
            if crc32c.crc32c(data) != stored_crc:
                raise StoreCorruptError(
                    f"{where}: chunk {chunk} fails its checksum (corrupt bytes); run `compsae verify` and re-harvest"
                )
        arr = np.frombuffer(data, dtype=dt).reshape(self.chunk_rows, d)
        return arr[: stop - start]

    def _shard_bytes(self, hook: str, shard: int) -> Any:
        key = (hook, shard)
        with self._cache_lock:
            if key in self._shard_cache:
                self._shard_cache.move_to_end(key)
                return self._shard_cache[key]
        path = f"{self.path}/acts/{hook}/c/{shard}/0"
        try:
            if self.is_local:
                with open(path, "rb") as f:
                    buf: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            else:
                buf = self.fs.cat_file(path)
        except (FileNotFoundError, ValueError) as e:
            raise StoreCorruptError(
                f"store {self.url}, hook {hook}, shard {shard}: shard file missing or empty ({e.__class__.__name__}); "
                "re-run the harvest to rewrite it"
            ) from None
        with self._cache_lock:
            self._shard_cache[key] = buf
            # local maps cost only address space; remote shards cost memory
            limit = 4096 if self.is_local else 4
            while len(self._shard_cache) > limit:
                self._shard_cache.popitem(last=False)
        return buf

    def verify(self) -> list[str]:
        """Check every chunk checksum and every shard digest; return the problems found."""
        problems: list[str] = []
        done = self.done_shards()
        recorded = self.group["progress/shard_crc"][: self.n_shards]
        for shard in range(self.n_shards):
            if shard not in done:
                problems.append(f"shard {shard}: not completely written")
                continue
            start, stop = self.shard_range(shard)
            digest = 0
            for hook in self.hooks:
                c0 = start // self.chunk_rows
                c1 = -(-stop // self.chunk_rows)
                try:
                    parts = [self.read_chunk_raw(hook, c) for c in range(c0, c1)]
                except StoreCorruptError as e:
                    problems.append(str(e))
                    continue
                digest = crc32c.crc32c(np.ascontiguousarray(np.concatenate(parts)).tobytes(), digest)
            for name in ("tokens", "seq_id", "pos"):
                col = self.group[name][start:stop]
                digest = crc32c.crc32c(col.astype(col.dtype.newbyteorder("<")).tobytes(), digest)
            if digest != int(recorded[shard]):
                problems.append(f"shard {shard}: content does not match its recorded checksum")
        return problems

    def close(self) -> None:
        """Drop cached shard maps."""
        with self._cache_lock:
            for buf in self._shard_cache.values():
                if isinstance(buf, mmap.mmap):
                    # arrays may still view the map; it then goes away with them
                    with contextlib.suppress(BufferError):
                        buf.close()
            self._shard_cache.clear()


def _wipe(url: str) -> None:
    """Remove a store's contents but not its lock file (a writer may hold it right now)."""
    fs, path = fsspec.core.url_to_fs(url)
    for entry in fs.ls(path, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] != _LOCK_NAME:
            fs.rm(entry, recursive=True)


def _plain_encoder(arr: zarr.Array) -> Callable[[bytes], bytes] | None:
    """How to encode a chunk of `arr` when its codecs are little-endian bytes, optionally followed
    by zstd (what `create` gives the small arrays); None for anything else."""
    codecs = arr.metadata.codecs
    if not codecs or not isinstance(codecs[0], BytesCodec) or getattr(codecs[0].endian, "value", None) not in (
            None, "little"):
        return None
    if len(codecs) == 1:
        return bytes
    if len(codecs) == 2 and isinstance(codecs[1], ZstdCodec):
        return Zstd(level=codecs[1].level, checksum=codecs[1].checksum).encode
    return None


def _write_file(path: str, pieces: list[Any]) -> None:
    """Write a local file from `pieces` (buffers) as Zarr does: to a temporary name, then renamed,
    so a reader never sees half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, pieces)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_all(fd: int, pieces: list[Any]) -> None:
    """Write `pieces` (buffers) to `fd` back to back, with as few system calls as it takes."""
    views = [memoryview(p).cast("B") for p in pieces]
    while views:
        done = os.writev(fd, views[:_IOV_MAX])
        while views and done >= len(views[0]):  # drop what was written, keep the rest of a piece
            done -= len(views[0])
            views.pop(0)
        if done:
            views[0] = views[0][done:]


@contextmanager
def writer_lock(url: str, what: str = "harvest") -> Iterator[None]:
    """Exclusive writer lock on the store at `url` (which need not exist yet).

    Local stores use an advisory `flock`, released by the kernel even on kill -9; object stores
    have none, so there an exclusive marker object is written and removed on exit."""
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    if isinstance(fs, LocalFileSystem):
        import fcntl

        os.makedirs(path, exist_ok=True)
        handle = open(os.path.join(path, _LOCK_NAME), "a+")  # noqa: SIM115 - held for the lock's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(
                f"another {what} is writing to {url} right now; wait for it to finish or choose another store"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
    else:
        lock_path = f"{path}/{_LOCK_NAME}"
        if fs.exists(lock_path):
            raise UserError(
                f"another {what} holds {url}/{_LOCK_NAME}; if no writer is running, delete that object and retry"
            )
        fs.pipe_file(lock_path, json.dumps({"pid": os.getpid()}).encode())
        try:
            yield
        finally:
            fs.rm_file(lock_path)


def shard_moments(x: np.ndarray, block_rows: int = 1024) -> np.ndarray:
    """[count, mean (d), M2 (d), norm sum] of `x: [rows, d]` (any float dtype), in float64.

    Computed in blocks of `block_rows` (a float64 copy of the whole shard costs more than the rest
    of the write path together), each block's mean and M2 merged with `merge_moments`."""
    n, d = x.shape
    counts, means, m2s, norm_sum = [], [], [], 0.0
    for lo in range(0, n, block_rows):
        block = x[lo:lo + block_rows].astype(np.float64)  # [b, d]
        norm_sum += float(np.sqrt(np.einsum("ij,ij->i", block, block)).sum())
        mean = block.mean(axis=0)
        block -= mean
        counts.append(len(block))
        means.append(mean)
        m2s.append(np.einsum("ij,ij->j", block, block))
    if not counts:
        return np.zeros(2 * d + 2)
    count, mean, m2 = merge_moments(np.asarray(counts), np.stack(means), np.stack(m2s))
    return np.concatenate([[count], mean, m2, [norm_sum]])
