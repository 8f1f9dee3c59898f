"""`ActivationStore`: one Zarr v3 group of per-token activations, written shard by shard.

Layout (see docs/architecture.md):
    acts/<hook>            [n_rows, d_model]  chunked along tokens, sharded, raw little-endian +
    crc32c tokens, seq_id, pos    [n_rows]           the token behind every row, its sequence and
    position progress/shard_done    [n_shards]         1 once a shard is completely written (resume
    point) progress/shard_crc     [n_shards]         crc32c of everything written for that shard
    progress/stats/<hook>  [n_shards, 2d+2]   per-shard count, mean, M2 and norm sum (float64)
The manifest lives in the group attributes.  Rows are in harvest order; the loader shuffles.

This class is the facade: the byte format is `store.format`, writing shards `store.writer`,
reading chunks `store.reader`, statistics `store.moments`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import crc32c
import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore

from compsae import durable
from compsae.errors import StoreCorruptError, UserError
from compsae.object_store import object_store_error
from compsae.store import integrity
from compsae.store.crc import crc32c_concat
from compsae.store.format import (  # noqa: F401 - re-exported: the names stages import from here
    FORMAT,
    LEGACY_FORMAT,
    LOCK_NAME,
    READABLE_FORMATS,
    SIDE_ARRAYS,
    SIDE_TABLE,
    bind_crc,
    bound_crc,
    check_peak,
    chunk_table,
    from_storage,
    read_row_chunks,
    storage_dtype,
    to_storage,
)
from compsae.store.layout import StoreLayout
from compsae.store.moments import shard_moments, stats_from_shards  # noqa: F401 - re-exported
from compsae.store.reader import ShardReader
from compsae.store.writer import ShardWriter, lay_out, wipe

_SHARDS_PER_READ = (
    16  # side-column shards read at once: 2 MB of sequence ids at 16,384 rows a shard
)


def _raise_unless_corrupt(error: Exception) -> None:
    """Raise the object store's one-line error when a read failed for want of credentials or a
    network, not because the bytes are corrupt (re-harvesting would not help)."""
    store_error = object_store_error(error)
    if store_error is not None:
        raise store_error from None


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
    return durable.json_digest(
        {
            k: v
            for k, v in manifest.items()
            if k not in ("stats", "shard_checksums", "created_at", "store_id", integrity.INTEGRITY)
        }
    )


def refuse_foreign_folder(url: str) -> None:
    """Refuse to write a store into a folder that holds anything but a compsae store (or the
    leftovers of one killed while being created): `--force` replaces a store, never a user's
    files."""
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise UserError(
            f"{url} is a file, not a folder; point harvest.store at a new or empty folder"
        )
    names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)} - {
        LOCK_NAME
    }
    if not names:
        return
    if "zarr.json" in names:
        try:
            attrs = json.loads(fs.cat_file(f"{path}/zarr.json")).get("attributes") or {}
        except (ValueError, OSError, AttributeError):
            attrs = None
        if isinstance(attrs, dict):
            manifest = attrs.get("manifest")
            if isinstance(manifest, dict) and manifest.get("format") in READABLE_FORMATS:
                return
            if not attrs and names == {"zarr.json"}:
                return  # a store killed between creating its group and writing its manifest
    shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
    raise UserError(
        f"{url} is not empty ({shown}) and holds no compsae store; compsae never overwrites "
        "other files, even with --force: point harvest.store at a new or empty folder"
    )


def writer_lock(url: str, what: str = "harvest") -> Any:
    """Exclusive writer lock on the store at `url` (which need not exist yet): a second writer is
    refused with a clear error (see `durable.exclusive_lock`)."""
    return durable.exclusive_lock(
        url,
        LOCK_NAME,
        f"another {what} is writing to {url} right now; wait for it to finish or choose another "
        "store",
    )


class ActivationStore:
    """A Zarr v3 activation store: create or open it, write shards, read chunks fast."""

    def __init__(self, url: str, group: zarr.Group, read_only: bool) -> None:
        self.url = url.rstrip("/")
        self.group = group
        self.read_only = read_only
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._columns: dict[str, np.ndarray] = {}
        self._tables: dict[str, np.ndarray] = {}
        manifest = group.attrs.get("manifest", {})
        if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS:
            raise UserError(
                f"{url} is not a compsae store (no compsae manifest); harvest into it first"
            )
        self.manifest: dict[str, Any] = dict(manifest)
        try:
            self.layout = StoreLayout(**self.manifest["layout"])
            for hook, d in self.manifest["hooks"].items():
                if not (isinstance(hook, str) and isinstance(d, int) and d > 0):
                    raise ValueError(f"hook {hook!r}: width {d!r}")
            if not (
                isinstance(self.manifest["n_rows"], int)
                and isinstance(self.manifest["n_shards"], int)
            ):
                raise ValueError("n_rows / n_shards are not integers")
            if self.manifest["format"] != LEGACY_FORMAT and not isinstance(
                self.manifest.get("store_id"), str
            ):
                raise ValueError("no store_id")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreCorruptError(
                f"store {url}: its manifest (zarr.json) is incomplete or invalid "
                f"({str(e).splitlines()[0][:80]}); restore it or re-harvest"
            ) from None
        if self.legacy:
            self._refuse_downgrade()
        self._reader = ShardReader(self.url, self.fs, self.path, self.is_local, self.layout)
        self._writer = ShardWriter(self)

    def _refuse_downgrade(self) -> None:
        """A manifest saying format 1 over a store with format-2 artefacts (a store id, metadata
        digests, bound-checksum tables) had its format edited: reading it as format 1 would switch
        off every check format 2 added, so it is refused."""
        found = [key for key in ("store_id", integrity.INTEGRITY) if key in self.manifest]
        found += [
            name
            for name in (SIDE_TABLE, *(chunk_table(h) for h in self.manifest["hooks"]))
            if self.fs.exists(f"{self.path}/{name}/zarr.json")
        ]
        if found:
            raise StoreCorruptError(
                f"store {self.url}: its manifest says {LEGACY_FORMAT} but the store has what only "
                f"{FORMAT} writes "
                f"({', '.join(found[:3])}); the format was edited: restore it to {FORMAT} or "
                "re-harvest"
            )

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
        refuse_foreign_folder(url)
        if overwrite and store_exists(url):
            wipe(url)
        n_shards = max(1, -(-n_rows // layout.shard_rows))
        manifest = {
            **manifest,
            "format": FORMAT,
            "store_id": uuid.uuid4().hex,  # what its checksums are bound to: see store.integrity
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
        lay_out(group, hooks, n_rows, n_shards, layout)
        group.attrs["manifest"] = {**manifest, "laid_out": True}
        return cls(url, group, read_only=False)

    @classmethod
    def open(cls, url: str, mode: str = "r") -> ActivationStore:
        """Open an existing store (`mode` "r" to read, "r+" to continue writing)."""
        if not store_exists(url):
            raise UserError(f"no store at {url}; run `compsae harvest` first or check the path")
        read_only = mode == "r"
        try:
            group = zarr.open_group(_zarr_store(url, read_only=read_only), mode=mode, zarr_format=3)
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise StoreCorruptError(
                f"store {url}: zarr.json cannot be read ({e.__class__.__name__}: "
                f"{str(e).splitlines()[0][:80] if str(e) else ''}); restore it or re-harvest"
            ) from None
        store = cls(url, group, read_only=read_only)
        if read_only and store.complete and not store.legacy:
            problems = integrity.metadata_problems(store)
            if problems:
                raise StoreCorruptError(problems[0])
        return store

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
        refuse_foreign_folder(url)
        if store_exists(url):
            try:
                existing = cls.open(url, mode="r+")
            except UserError:
                existing = None
            if existing is not None and existing.manifest.get("laid_out") is False:
                return cls.create(
                    url, hooks, n_rows, layout, manifest, overwrite=True
                )  # killed mid-layout
            if existing is not None and existing.manifest.get("config_hash") == manifest.get(
                "config_hash"
            ):
                if force:
                    return cls.create(url, hooks, n_rows, layout, manifest, overwrite=True)
                return existing
            if not force:
                had = existing.manifest.get("config_hash") if existing else "not a compsae store"
                raise UserError(
                    f"the store at {url} was made with a different config ({had} != "
                    f"{manifest.get('config_hash')}); pass --force to overwrite it or choose "
                    "another store"
                )
            return cls.create(url, hooks, n_rows, layout, manifest, overwrite=True)
        return cls.create(url, hooks, n_rows, layout, manifest)

    # -- properties
    # ---------------------------------------------------------------------------------

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
    def legacy(self) -> bool:
        """True for a store of format 1 (no bound checksums, no metadata digests)."""
        return self.manifest.get("format") == LEGACY_FORMAT

    @property
    def store_id(self) -> str:
        return str(self.manifest.get("store_id", ""))

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def d_model(self, hook: str) -> int:
        return int(self.manifest["hooks"][self._check_hook(hook)])

    def _check_hook(self, hook: str) -> str:
        if hook not in self.manifest["hooks"]:
            raise UserError(
                f"the store at {self.url} has no hook {hook!r}; it holds {', '.join(self.hooks)}"
            )
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
        done = self._read_array("progress/shard_done")
        return {int(i) for i in np.flatnonzero(done == 1)}

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
        """Write every row of one shard (all hooks), its statistics, and then its completion mark.

        `acts[hook]: [rows, d_model]` float (any float dtype, converted and range-checked here; or
        already in the storage dtype, then only checked for NaN/inf; `checked`: in the storage
        dtype and already range-checked by the caller, as the harvest does on the device).
        `moments[hook]`: the shard's `shard_moments` of the stored values when the caller has them
        (the harvest computes them on the GPU); computed here otherwise.  The mark is written
        last, so a shard interrupted half-way is simply written again."""
        self._writer.write_shard(shard, acts, tokens, seq_id, pos, moments, checked)

    def finalize(
        self, n_rows: int | None = None, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Mark the store complete: shrink it to `n_rows` when the data ran out early, merge the
        per-shard statistics and write the final manifest.  Returns the manifest."""
        if n_rows is not None and n_rows != self.n_rows:
            if n_rows > self.n_rows or n_rows % self.shard_rows:
                raise ValueError("finalize can only drop whole shards")
            self.shrink(n_rows)
        missing = sorted(set(range(self.n_shards)) - self.done_shards())
        if missing:
            raise StoreCorruptError(f"store {self.url}: shards {missing[:10]} were never written")
        stats: dict[str, Any] = {}
        for hook in self.hooks:
            stats[hook] = self._merged_stats(hook)
        self.manifest["stats"] = stats
        self.manifest["shard_checksums"] = [
            int(c) for c in self._read_array("progress/shard_crc", self.n_shards)
        ]
        self.manifest.update(extra or {})
        self.manifest["complete"] = True
        self.manifest.pop(integrity.INTEGRITY, None)
        if not self.legacy:
            self.manifest[integrity.INTEGRITY] = integrity.metadata_digests(self)
        self.group.attrs["manifest"] = self.manifest
        return self.manifest

    def shrink(self, n_rows: int, extra: dict[str, Any] | None = None) -> None:
        """Drop every row from `n_rows` on, before the store is finalized (the data ran out before
        the rows it was laid out for); `extra` goes into the manifest, which is saved, so a resumed
        writer sees the new size.  The shard now holding the last row may be partial; shards
        already written must end at or before `n_rows`."""
        if not 0 < n_rows <= self.n_rows:
            raise ValueError(f"cannot shrink a store of {self.n_rows} rows to {n_rows}")
        cut = sorted(s for s in self.done_shards() if self.shard_range(s)[1] > n_rows)
        if cut:
            raise UserError(
                f"store {self.url}: the data now ends at row {n_rows:,}, inside shards {cut[:5]} "
                "written by an earlier run (the data changed since); rerun with --force"
            )
        for hook in self.hooks:
            arr = self.group[f"acts/{hook}"]
            arr.resize((n_rows, arr.shape[1]))
        for name, _ in SIDE_ARRAYS:
            self.group[name].resize((n_rows,))
        n_shards = max(1, -(-n_rows // self.shard_rows))
        # the per-shard arrays too: a shrunk store is the one laid out for its rows from the start
        per_shard = ["progress/shard_done", "progress/shard_crc"] + [
            f"progress/stats/{h}" for h in self.hooks
        ]
        if not self.legacy:
            per_shard += [SIDE_TABLE] + [chunk_table(h) for h in self.hooks]
        for name in per_shard:
            arr = self.group[name]
            arr.resize((n_shards, *arr.shape[1:]))
        self.manifest.update(extra or {})
        self.manifest["n_rows"] = int(n_rows)
        self.manifest["n_shards"] = n_shards
        self._writer.forget_arrays()  # cached handles still have the old shape
        self._columns.clear()
        self._tables.clear()
        self.group.attrs["manifest"] = self.manifest

    def _merged_stats(self, hook: str) -> dict[str, Any]:
        return stats_from_shards(
            self._read_array(f"progress/stats/{hook}", self.n_shards), self.d_model(hook)
        )

    # -- reading --------------------------------------------------------------------------------

    def stats(self, hook: str) -> dict[str, Any]:
        """Float64 statistics of a hook: count, mean [d], var [d] (population), mean_norm."""
        self._check_hook(hook)
        s = self.manifest.get("stats", {}).get(hook) or self._merged_stats(hook)
        return {
            "count": s["count"],
            "mean": np.asarray(s["mean"]),
            "var": np.asarray(s["var"]),
            "mean_norm": s["mean_norm"],
        }

    def _read_array(self, name: str, stop: int | None = None, start: int = 0) -> np.ndarray:
        """Rows [start, stop) of a small array (its chunk files read directly when local, else
        through Zarr), any failure to decode it one line."""
        try:
            arr = self._writer.array(name)
            if self.is_local:
                rows = read_row_chunks(
                    arr, f"{self.path}/{name}", arr.shape[0] if stop is None else stop, start
                )
                if rows is not None:
                    return rows
            return arr[start:stop]
        except Exception as e:  # noqa: BLE001 - a decompressor or codec error on corrupt bytes, whatever its type
            _raise_unless_corrupt(e)
            raise StoreCorruptError(
                f"store {self.url}, {name}: cannot be read ({e.__class__.__name__}: "
                f"{str(e).splitlines()[0][:80] if str(e) else 'corrupt bytes'}); "
                "run `compsae verify` and re-harvest"
            ) from None

    def _table(self, name: str) -> np.ndarray:
        """A bound-checksum table (read once)."""
        if name not in self._tables:
            self._tables[name] = self._read_array(name, self.n_shards)
        return self._tables[name]

    def _column(self, name: str) -> np.ndarray:
        if name not in self._columns:
            values = np.empty(self.n_rows, dtype=dict(SIDE_ARRAYS)[name])
            for lo, part in self.column_parts(name):
                values[lo : lo + len(part)] = part
            self._columns[name] = values
        return self._columns[name]

    def column_parts(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """A side column ("tokens", "seq_id" or "pos") one shard at a time: (first row, values),
        each part checked against its bound checksum.  Holds a few shards' values, however large
        the store (the whole column is 4-8 bytes per row: gigabytes at a billion tokens); they are
        read `_SHARDS_PER_READ` at a time, which an object store serves concurrently."""
        for first in range(0, self.n_shards, _SHARDS_PER_READ):
            last = min(first + _SHARDS_PER_READ, self.n_shards)
            lo, hi = self.shard_range(first)[0], self.shard_range(last - 1)[1]
            values = self._side_rows(name, lo, hi)
            for shard in range(first, last):
                s_lo, s_hi = self.shard_range(shard)
                yield s_lo, self._checked_part(name, shard, values[s_lo - lo : s_hi - lo])

    def column_part(self, name: str, shard: int) -> np.ndarray:
        """The rows of side column `name` in `shard`, checked against their bound checksum."""
        lo, hi = self.shard_range(shard)
        return self._checked_part(name, shard, self._side_rows(name, lo, hi))

    def _side_rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows `lo .. hi` of side column `name`: from the loaded column if there is one, else
        read."""
        return (
            self._columns[name][lo:hi] if name in self._columns else self._read_side(name, lo, hi)
        )

    def _read_side(self, name: str, lo: int, hi: int) -> np.ndarray:
        if name not in dict(SIDE_ARRAYS):
            raise ValueError(
                f"{name!r} is not a side column ({', '.join(n for n, _ in SIDE_ARRAYS)})"
            )
        values = self._read_array(name, hi, lo)
        if len(values) != hi - lo:
            raise StoreCorruptError(
                f"store {self.url}, {name}: rows {lo}..{hi} hold {len(values)} values; run "
                "`compsae verify` and re-harvest"
            )
        return values

    def _checked_part(self, name: str, shard: int, values: np.ndarray) -> np.ndarray:
        if not self.legacy and name not in self._columns:  # a loaded column was checked whole
            integrity.check_side_part(self, name, shard, values, self._table(SIDE_TABLE))
        return values

    def column_view(self, name: str) -> SideColumn:
        """Side column `name` read on demand (`SideColumn`): for stages that look up some rows of
        a store too large to hold the whole column."""
        return SideColumn(self, name)

    @property
    def tokens(self) -> np.ndarray:
        return self._column("tokens")

    @property
    def seq_id(self) -> np.ndarray:
        return self._column("seq_id")

    @property
    def pos(self) -> np.ndarray:
        return self._column("pos")

    def read_rows_raw(self, hook: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a hook in the storage dtype, every chunk's checksums checked."""
        self._check_hook(hook)
        start, stop = max(0, start), min(stop, self.n_rows)
        if stop <= start:
            return np.zeros((0, self.d_model(hook)), dtype=storage_dtype(self.layout.dtype))
        c0, c1 = start // self.chunk_rows, -(-stop // self.chunk_rows)
        parts = [self.read_chunk_raw(hook, c) for c in range(c0, c1)]
        block = parts[0] if len(parts) == 1 else np.concatenate(parts)
        off = c0 * self.chunk_rows
        return block[start - off : stop - off]

    def read_rows(self, hook: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a hook as float32, every chunk's checksums checked."""
        return from_storage(self.read_rows_raw(hook, start, stop), self.layout.dtype)

    def read_chunk(self, hook: str, chunk: int) -> np.ndarray:
        """One chunk of a hook as float32 `[rows_in_chunk, d_model]`, checksum verified.

        The fast path reads the shard file's bytes directly (memory-mapped when local): an
        uncompressed Zarr v3 chunk is plain little-endian data followed by its crc32c."""
        raw = self.read_chunk_raw(hook, chunk)
        return from_storage(raw, self.layout.dtype)

    def read_chunk_raw(self, hook: str, chunk: int) -> np.ndarray:
        """One chunk in the storage dtype (a read-only view into the mapped shard when possible),
        checked against its checksum bound to (store, hook, chunk index) (format 2), else its own
        crc32c."""
        return self._checked_chunk(hook, chunk)[0]

    def _checked_chunk(self, hook: str, chunk: int) -> tuple[np.ndarray, int | None]:
        """`read_chunk_raw` and the crc32c of the chunk's bytes (the pass that checks the bound
        checksum; None for a format-1 store, whose chunks Zarr's own crc checked)."""
        self._check_hook(hook)
        if not 0 <= chunk < self.n_chunks:
            raise IndexError(f"chunk {chunk} outside 0..{self.n_chunks - 1}")
        start = chunk * self.chunk_rows
        stop = min(start + self.chunk_rows, self.n_rows)
        shard, inner = divmod(chunk, self.layout.chunks_per_shard)
        if self.layout.compressor != "none":
            data = self._read_acts_zarr(hook, start, stop)
        else:
            data = self._reader.chunk(
                hook, chunk, self.d_model(hook), stop - start, own_crc=self.legacy
            )
        if self.legacy:
            if data is None:
                data = np.zeros(
                    (stop - start, self.d_model(hook)), dtype=storage_dtype(self.layout.dtype)
                )
            return data, None
        expect = int(self._table(chunk_table(hook))[shard, inner])
        crc = crc32c.crc32c(np.ascontiguousarray(data)) if data is not None else None
        if crc is None or bind_crc(crc, data.nbytes, self.store_id, hook, chunk) != expect:
            raise StoreCorruptError(
                f"store {self.url}, hook {hook}, shard {shard}: chunk {chunk} fails its checksum "
                "(corrupt, "
                "moved or from another store); run `compsae verify` and re-harvest"
            )
        return data, crc

    def _read_acts_zarr(self, hook: str, start: int, stop: int) -> np.ndarray:
        try:
            return self.zarr_array(hook)[start:stop]
        except Exception as e:  # noqa: BLE001 - a decompressor or codec error on corrupt bytes, whatever its type
            _raise_unless_corrupt(e)
            shard = start // self.shard_rows
            raise StoreCorruptError(
                f"store {self.url}, hook {hook}, shard {shard}: cannot be read "
                f"({e.__class__.__name__}); run `compsae verify` and re-harvest"
            ) from None

    def verify(self, deep: bool = False) -> list[str]:
        """Check every chunk checksum, every shard digest and (format 2) the side arrays and the
        metadata digests; `deep` also recomputes the statistics.  Returns one line per problem."""
        problems: list[str] = []
        if self.complete and not self.legacy:
            problems += integrity.metadata_problems(self)
        try:
            done = self.done_shards()
            recorded = self._read_array("progress/shard_crc", self.n_shards)
        except StoreCorruptError as e:
            return [*problems, str(e)]
        columns: dict[str, np.ndarray | None] = {}
        for name, _ in SIDE_ARRAYS:
            try:
                columns[name] = self._column(name) if done == set(range(self.n_shards)) else None
            except StoreCorruptError as e:
                problems.append(str(e))
                columns[name] = None
        for shard in range(self.n_shards):
            if shard not in done:
                problems.append(f"store {self.url}, shard {shard}: not completely written")
                continue
            start, stop = self.shard_range(shard)
            digest, unreadable = 0, False
            for hook in self.hooks:
                try:  # the shard's digest from its chunks' crcs: each chunk's bytes are read once
                    for chunk in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
                        data, crc = self._checked_chunk(hook, chunk)
                        if crc is None:
                            crc = crc32c.crc32c(np.ascontiguousarray(data))
                        digest = crc32c_concat(digest, crc, data.nbytes)
                except StoreCorruptError as e:
                    problems.append(str(e))
                    unreadable = True
            for name, dt in SIDE_ARRAYS:
                col = columns[name]
                if col is None:
                    try:
                        col = self._read_array(name, self.n_rows)
                    except StoreCorruptError:
                        continue  # reported above
                digest = crc32c.crc32c(np.ascontiguousarray(col[start:stop], dtype=dt), digest)
            if not unreadable and digest != int(recorded[shard]):
                problems.append(
                    f"store {self.url}, shard {shard}: content does not match its recorded checksum"
                )
        if deep and not problems:
            problems += integrity.deep_stats_problems(self)
        return list(dict.fromkeys(problems))  # a problem found twice is said once

    def close(self) -> None:
        """Drop cached shard maps."""
        self._reader.close()


class SideColumn:
    """One side column of a store ("tokens", "seq_id" or "pos"), read on demand.

    `col[rows]` (an int, a slice without step, or an int array of any shape) reads only the
    shards holding those rows, each checked against its bound checksum; the last `keep_shards`
    are kept, so nearby lookups read nothing again.  The whole column (4-8 bytes a row) is never
    in memory unless the store had already loaded it."""

    def __init__(self, store: ActivationStore, name: str, keep_shards: int = 16) -> None:
        self.store, self.name, self.keep_shards = store, name, keep_shards
        self._parts: dict[int, np.ndarray] = {}  # shard -> values, oldest first

    def __len__(self) -> int:
        return self.store.n_rows

    def _part(self, shard: int) -> np.ndarray:
        part = self._parts.pop(shard, None)
        if part is None:
            part = self.store.column_part(self.name, shard)
            while len(self._parts) >= self.keep_shards:
                self._parts.pop(next(iter(self._parts)))
        self._parts[shard] = part  # now the newest
        return part

    def __getitem__(self, key: int | slice | np.ndarray) -> Any:
        n, per = self.store.n_rows, self.store.shard_rows
        if isinstance(key, slice):
            if key.step not in (None, 1):
                raise ValueError("a side column is sliced without a step")
            lo, hi, _ = key.indices(n)
            rows = np.arange(lo, max(lo, hi))
        elif np.ndim(key) == 0:
            row = int(key)
            row = row + n if row < 0 else row
            if not 0 <= row < n:
                raise IndexError(f"row {int(key)} outside a store of {n} rows")
            return self._part(row // per)[row % per]
        else:
            if np.asarray(key).dtype == bool:
                raise TypeError(
                    "a side column is indexed by row numbers, not by a mask (use np.flatnonzero)"
                )
            rows = np.asarray(key, dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(f"rows outside a store of {n} rows")
        flat = rows.ravel()
        out = np.empty(flat.shape, dtype=dict(SIDE_ARRAYS)[self.name])
        shard_of = flat // per
        order = np.argsort(shard_of, kind="stable")
        bounds = np.flatnonzero(np.diff(shard_of[order])) + 1
        for group in np.split(order, bounds) if flat.size else []:
            shard = int(shard_of[group[0]])
            out[group] = self._part(shard)[flat[group] - shard * per]
        return out.reshape(rows.shape)
