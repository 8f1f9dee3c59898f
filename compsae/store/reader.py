"""Reading a store's activation chunks fast: shard files memory-mapped (local) or fetched whole
(object stores), kept in a small cache, each chunk decoded with its checksum checked."""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from compsae.errors import StoreCorruptError
from compsae.store.format import decode_chunk, shard_file, storage_dtype
from compsae.store.layout import StoreLayout


class ShardReader:
    """Chunks of the uncompressed shard files under `path` on file system `fs`."""

    def __init__(self, url: str, fs: Any, path: str, is_local: bool, layout: StoreLayout) -> None:
        self.url, self.fs, self.path, self.is_local, self.layout = url, fs, path, is_local, layout
        self._cache: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    def chunk(
        self, hook: str, chunk: int, d: int, rows: int, own_crc: bool = True
    ) -> np.ndarray | None:
        """The first `rows` rows of chunk `chunk` of `hook`, `[rows, d]` in the storage dtype (a
        read-only view into the mapped shard when possible); None for a chunk never written.
        `own_crc=False` skips the chunk's own crc32c, for a caller that checks a stronger one."""
        shard, inner = divmod(chunk, self.layout.chunks_per_shard)
        where = f"store {self.url}, hook {hook}, shard {shard}"
        data = decode_chunk(
            self._shard_bytes(hook, shard), inner, self.layout, d, where, chunk, own_crc
        )
        if data is None:
            return None
        return np.frombuffer(data, dtype=storage_dtype(self.layout.dtype)).reshape(
            self.layout.chunk_rows, d
        )[:rows]

    def _shard_bytes(self, hook: str, shard: int) -> Any:
        key = (hook, shard)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        path = f"{self.path}/{shard_file(hook, shard)}"
        try:
            if self.is_local:
                with open(path, "rb") as f:
                    buf: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            else:
                buf = self.fs.cat_file(path)
        except (FileNotFoundError, ValueError) as e:
            raise StoreCorruptError(
                f"store {self.url}, hook {hook}, shard {shard}: shard file missing or empty "
                f"({e.__class__.__name__}); "
                "re-run the harvest to rewrite it"
            ) from None
        with self._lock:
            self._cache[key] = buf
            # local maps cost only address space; remote shards cost memory
            limit = 4096 if self.is_local else 4
            while len(self._cache) > limit:
                self._cache.popitem(last=False)
        return buf

    def close(self) -> None:
        """Drop cached shard maps."""
        with self._lock:
            for buf in self._cache.values():
                if isinstance(buf, mmap.mmap):
                    # arrays may still view the map; it then goes away with them
                    with contextlib.suppress(BufferError):
                        buf.close()
            self._cache.clear()
