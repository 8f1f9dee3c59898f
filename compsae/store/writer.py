"""Writing a store: laying its arrays out, then one shard at a time (activations, statistics,
side arrays, and last the shard's completion mark)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import crc32c
import fsspec
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from compsae import durable
from compsae.errors import ForeignFilesError
from compsae.files import GROUND_TRUTH_JSON, GROUND_TRUTH_TENSORS
from compsae.store.crc import crc32c_concat
from compsae.store.format import (
    LOCK_NAME,
    SIDE_ARRAYS,
    SIDE_TABLE,
    bind_crc,
    bound_crc,
    chunk_table,
    encode_shard,
    from_storage,
    plain_encoder,
    shard_file,
    storage_dtype,
    to_storage,
)
from compsae.store.layout import StoreLayout
from compsae.store.moments import shard_moments

if TYPE_CHECKING:
    from compsae.store.activation_store import ActivationStore


def lay_out(
    group: zarr.Group, hooks: dict[str, int], n_rows: int, n_shards: int, layout: StoreLayout
) -> None:
    """Create every array of an empty store in `group`."""
    inner = [Crc32cCodec()] if layout.checksum else []
    if layout.compressor == "zstd":
        inner = [ZstdCodec(level=3), *inner]
    for hook, d_model in hooks.items():
        group.create_array(
            f"acts/{hook}",
            shape=(n_rows, d_model),
            dtype=storage_dtype(layout.dtype),
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
        group.create_array(
            chunk_table(hook),
            shape=(n_shards, layout.chunks_per_shard),
            dtype="<u4",
            chunks=(1, layout.chunks_per_shard),
            fill_value=0,
            config={"write_empty_chunks": True},
        )
    group.create_array(
        SIDE_TABLE,
        shape=(n_shards, len(SIDE_ARRAYS)),
        dtype="<u4",
        chunks=(1, len(SIDE_ARRAYS)),
        fill_value=0,
        config={"write_empty_chunks": True},
    )
    for name, dt in SIDE_ARRAYS:
        group.create_array(
            name, shape=(n_rows,), dtype=dt, chunks=(layout.shard_rows,), fill_value=0
        )
    group.create_array(
        "progress/shard_done",
        shape=(n_shards,),
        dtype="u1",
        chunks=(1,),
        fill_value=0,
        config={"write_empty_chunks": True},
    )
    group.create_array(
        "progress/shard_crc",
        shape=(n_shards,),
        dtype="<u4",
        chunks=(1,),
        fill_value=0,
        config={"write_empty_chunks": True},
    )


# files compsae writes at a store's root besides zarr's: the writer lock, and the ground truth a
# synthetic store carries
_ROOT_FILES = frozenset({LOCK_NAME, GROUND_TRUTH_JSON, GROUND_TRUTH_TENSORS})


def _array_ndim(fs: Any, path: str) -> int | None:
    """The number of dimensions of the zarr v3 array whose zarr.json is at `path`, or None when
    it is not an array's (a group's, or unreadable)."""
    try:
        node = json.loads(fs.cat_file(path))
    except (ValueError, OSError):
        return None
    if not isinstance(node, dict) or node.get("node_type") != "array":
        return None
    shape = node.get("shape")
    return len(shape) if isinstance(shape, list) else None


def _is_chunk(rel: str, arrays: dict[str, int]) -> bool:
    """Whether `rel` is a chunk file of one of `arrays` (folder -> number of dimensions): zarr's
    default key `<array>/c/<i>/<j>...`, one integer per dimension."""
    for folder, ndim in arrays.items():
        prefix = f"{folder}/c/" if folder else "c/"
        if rel.startswith(prefix):
            parts = rel[len(prefix) :].split("/")
            if len(parts) == ndim and all(p.isdigit() for p in parts):
                return True
    return False


def foreign_files(url: str) -> list[str]:
    """The files under the store folder at `url` that compsae did not write, relative to it and
    sorted: anything but zarr's node files (`zarr.json`: read or not, a store killed while being
    laid out may hold a half-written one), the chunk files of the arrays they describe
    (`<array>/c/<i>/<j>`, one integer per dimension), the lock, a synthetic store's ground truth,
    and the temporary files of a killed write of one of those."""
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    files = [f.rstrip("/")[len(path) + 1 :] for f in fs.find(path)]
    nodes = {rel for rel in files if rel.rsplit("/", 1)[-1] == "zarr.json"}
    arrays: dict[str, int] = {}
    for rel in nodes:
        ndim = _array_ndim(fs, f"{path}/{rel}")
        if ndim is not None:
            arrays[rel[: -len("zarr.json")].rstrip("/")] = ndim

    def own(rel: str) -> bool:
        return rel in nodes or rel in _ROOT_FILES or _is_chunk(rel, arrays)

    return sorted(
        rel for rel in files if not own(rel) and not own(durable.partial_target(rel) or "")
    )


def refuse_foreign_files(url: str) -> None:
    """Refuse (one line naming the first and the count) a store folder holding files compsae did
    not write: `--force` checks before it replaces the store, so it never deletes them."""
    foreign = foreign_files(url)
    if foreign:
        raise ForeignFilesError(url, foreign, "store folder")


def wipe(url: str) -> None:
    """Remove a store's contents but not its lock file (a writer may hold it right now).
    Refused, with nothing deleted, when the folder holds a file compsae did not write."""
    refuse_foreign_files(url)
    fs, path = fsspec.core.url_to_fs(url)
    for entry in fs.ls(path, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] != LOCK_NAME:
            fs.rm(entry, recursive=True)


class ShardWriter:
    """Writes whole shards of `store` (all hooks and side arrays of one row range at once)."""

    def __init__(self, store: ActivationStore) -> None:
        self.store = store
        self._arrays: dict[str, zarr.Array] = {}

    def forget_arrays(self) -> None:
        """Drop cached array handles (after a resize they hold the old shape)."""
        self._arrays.clear()

    def write_shard(
        self,
        shard: int,
        acts: dict[str, np.ndarray],
        tokens: np.ndarray,
        seq_id: np.ndarray,
        pos: np.ndarray,
        moments: dict[str, np.ndarray] | None = None,
        checked: bool = False,
    ) -> None:
        """See `ActivationStore.write_shard`."""
        store, layout = self.store, self.store.layout
        start, stop = store.shard_range(shard)
        rows = stop - start
        digest = 0
        small: list[
            tuple[str, tuple[int, ...], np.ndarray]
        ] = []  # (array, chunk, values): written after the acts
        for hook in store.hooks:
            x = np.asarray(acts[hook])
            if x.shape != (rows, store.d_model(hook)):
                raise ValueError(
                    f"shard {shard} of {hook}: expected {(rows, store.d_model(hook))}, got "
                    f"{x.shape}"
                )
            stored = (
                x
                if checked and x.dtype == storage_dtype(layout.dtype)
                else to_storage(x, layout.dtype, hook)
            )
            stored = np.ascontiguousarray(stored)
            # the one pass over the shard's bytes besides writing them: the codec's, the bound and
            # the digest's checksums all follow from each chunk's crc32c
            crcs = self._chunk_crcs(stored)
            if layout.compressor == "none":
                self._write_shard_file(hook, shard, stored, crcs)
            else:
                self.array(f"acts/{hook}")[start:stop] = stored
            for crc, nbytes in crcs:
                digest = crc32c_concat(digest, crc, nbytes)
            if not store.legacy:
                small.append(
                    (chunk_table(hook), (shard, 0), self._bound_crcs(hook, shard, crcs)[None, :])
                )
            stats = (
                moments[hook]
                if moments is not None
                else shard_moments(
                    stored if layout.dtype != "bfloat16" else from_storage(stored, "bfloat16")
                )
            )
            small.append(
                (f"progress/stats/{hook}", (shard, 0), np.asarray(stats, dtype="<f8")[None, :])
            )
        side = np.zeros(len(SIDE_ARRAYS), dtype="<u4")
        for i, ((name, dt), col) in enumerate(zip(SIDE_ARRAYS, (tokens, seq_id, pos), strict=True)):
            col = np.ascontiguousarray(col, dtype=dt)
            if col.shape != (rows,):
                raise ValueError(f"shard {shard}: {name} has shape {col.shape}, expected ({rows},)")
            small.append((name, (shard,), col))
            digest = crc32c.crc32c(col, digest)
            side[i] = bound_crc(col, store.store_id, name, shard)
        if not store.legacy:
            small.append((SIDE_TABLE, (shard, 0), side[None, :]))
        small.append(("progress/shard_crc", (shard,), np.array([digest], dtype="<u4")))
        self._put_chunks(small)
        self._put_chunks([("progress/shard_done", (shard,), np.array([1], dtype="u1"))])

    def _chunk_crcs(self, stored: np.ndarray) -> list[tuple[int, int]]:
        """(crc32c, bytes) of each chunk's rows of one shard (`stored: [rows, d]`, the last chunk
        possibly short)."""
        chunk_rows = self.store.chunk_rows
        return [
            (crc32c.crc32c(part), part.nbytes)
            for part in (stored[lo : lo + chunk_rows] for lo in range(0, len(stored), chunk_rows))
        ]

    def _bound_crcs(self, hook: str, shard: int, crcs: list[tuple[int, int]]) -> np.ndarray:
        """Bound checksums `[chunks_per_shard]` of one shard's chunks (`format.bound_crc`), from
        their crc32c; 0 for chunks past the end of the array."""
        per_shard = self.store.layout.chunks_per_shard
        out = np.zeros(per_shard, dtype="<u4")
        for inner, (crc, nbytes) in enumerate(crcs):
            out[inner] = bind_crc(crc, nbytes, self.store.store_id, hook, shard * per_shard + inner)
        return out

    def array(self, name: str) -> zarr.Array:
        """A cached handle on one array of the group (a group lookup reads its metadata again).
        Safe beside `forget_arrays` in another thread (writer threads run while a store shrinks)."""
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.store.group[name]
        return arr

    def _put_chunks(self, items: list[tuple[str, tuple[int, ...], np.ndarray]]) -> None:
        """Write each `(array name, chunk index, values)` as that whole chunk of the array.

        The small per-shard arrays (one chunk per shard) are encoded here and written as files:
        through Zarr each write costs milliseconds of event-loop round trips, as much as the
        shard's activations.  An array whose codecs are not plain bytes [+ zstd], or a write that
        does not cover its chunk, goes through Zarr."""
        files: dict[str, bytes] = {}
        for name, chunk, values in items:
            arr = self.array(name)
            shape = arr.metadata.chunk_grid.chunk_shape
            selection = tuple(
                slice(c * n, c * n + v) for c, n, v in zip(chunk, shape, values.shape, strict=True)
            )
            whole = all(
                sel.start == c * n and (v == n or sel.stop == size)
                for sel, c, n, v, size in zip(
                    selection, chunk, shape, values.shape, arr.shape, strict=True
                )
            )
            encode = plain_encoder(arr) if whole else None
            if encode is None:
                arr[selection] = values
                continue
            data = values
            if (
                values.shape != shape
            ):  # the array's last chunk: padded with the fill value, as Zarr does
                data = np.full(shape, arr.metadata.fill_value, dtype=values.dtype)
                data[tuple(slice(0, v) for v in values.shape)] = values
            files[f"{self.store.path}/{name}/{arr.metadata.encode_chunk_key(chunk)}"] = encode(
                np.ascontiguousarray(data, dtype=np.dtype(arr.dtype).newbyteorder("<")).tobytes()
            )
        if not files:
            return
        if not self.store.is_local:
            self.store.fs.pipe(files)  # object stores upload them concurrently
            return
        for path, data in files.items():
            durable.atomic_write(path, data, fs=self.store.fs, sync=False)  # see _write_shard_file

    def _write_shard_file(
        self, hook: str, shard: int, stored: np.ndarray, crcs: list[tuple[int, int]]
    ) -> None:
        """Write one uncompressed shard of `hook` as a whole file (see `format.encode_shard`).

        Not flushed file by file (a harvest writes thousands): a shard a power cut leaves half on
        the disk fails its checksums on the next read, and `compsae verify` names it."""
        data = encode_shard(stored, self.store.layout, [c for c, _ in crcs])
        durable.atomic_write(
            f"{self.store.path}/{shard_file(hook, shard)}", data, fs=self.store.fs, sync=False
        )
