"""Durable file operations in one place: atomic writes, exclusive locks and digests.

- `atomic_write`: a file is either its old bytes or its new bytes, never half of each: the bytes go
  to a temporary name in the same folder, are flushed to the disk (`fsync`), renamed over the
  target, and the folder itself is flushed so the rename survives a power cut.  On an object store
  a single PUT is atomic already.
- `exclusive_lock`: one writer per folder.  Local folders use an advisory `flock` (released by the
  kernel even on kill -9); object stores have none, so there an exclusive marker object is written
  and removed on exit.
- `digest` / `json_digest`: sha256, the only hash the project uses.  Content digests are 16 hex
  digits; stage folder names use 12 (`NAME_DIGITS`), short enough to read in a path.

This module imports nothing heavy: the CLI's `status` and error paths use it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from compsae.errors import UserError

DIGEST_DIGITS = 16  # content digests (manifests, outputs, config hashes)
NAME_DIGITS = 12  # stage folder names
_IOV_MAX = 1024  # buffers one writev call may take (Linux)

Buffers = bytes | bytearray | memoryview | Iterable[Any]


def digest(data: bytes | bytearray | memoryview, digits: int = DIGEST_DIGITS) -> str:
    """sha256 of `data` as `digits` hex digits (64 for the whole digest)."""
    return hashlib.sha256(data).hexdigest()[:digits]


def json_digest(obj: Any, digits: int = DIGEST_DIGITS) -> str:
    """sha256 of `obj` as canonical JSON (sorted keys), `digits` hex digits."""
    return digest(json.dumps(obj, sort_keys=True, default=str).encode(), digits)


def is_local(url: str) -> bool:
    """True when `url` is a path (or file:// URL) on this machine's file system."""
    fs, _ = fsspec.core.url_to_fs(url)
    return isinstance(fs, LocalFileSystem)


def check_url(url: str) -> None:
    """Raise ValueError when `url` names a protocol fsspec does not know (a typo like `s4://`)."""
    if "://" not in url:
        return
    protocol = url.split("://", 1)[0]
    known = set(fsspec.available_protocols())
    if any(p not in known for p in protocol.replace("::", "+").split("+")):
        raise ValueError(
            f"unknown URL protocol {protocol!r} in {url!r}; use a local path or one of file, "
            "memory, s3, gs, az, http(s) (with its fsspec package installed)"
        )


def _pieces(data: Buffers) -> list[memoryview]:
    if isinstance(data, bytes | bytearray | memoryview):
        return [memoryview(data).cast("B")]
    return [memoryview(p).cast("B") for p in data]


def write_all(fd: int, data: Buffers) -> None:
    """Write `data` (one buffer or several, back to back) to `fd` with as few system calls as it
    takes."""
    views = _pieces(data)
    while views:
        done = os.writev(fd, views[:_IOV_MAX])
        while views and done >= len(views[0]):  # drop what was written, keep the rest of a piece
            done -= len(views[0])
            views.pop(0)
        if done:
            views[0] = views[0][done:]


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (a rename in it) to the disk."""
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_PARTIAL = re.compile(r"(.+)\.[0-9a-f]{8}\.partial")  # `atomic_write`'s temporary name


def partial_target(name: str) -> str | None:
    """The file a temporary file of `atomic_write` named `name` was to become, or None when `name`
    is not one (a folder's own files then include the leftovers of a killed write)."""
    match = _PARTIAL.fullmatch(name)
    return match.group(1) if match else None


def atomic_write(url: str, data: Buffers, fs: Any = None, sync: bool = True) -> None:
    """Replace the file at `url` (path or URL) by `data` (bytes, or buffers written back to back).

    Local: temp file + fsync + rename + fsync of the folder; on failure (disk full, kill) the old
    file is untouched and the temp file removed when the process lives to do it (a killed writer
    leaves a `*.partial` file that nothing reads).  `sync=False` skips both fsyncs: still atomic
    against a killed process, not against a power cut (for files whose checksums are checked on
    every read anyway).  Elsewhere: one object PUT."""
    if fs is None:
        fs, url = fsspec.core.url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(url, b"".join(_pieces(data)))
        return
    folder = os.path.dirname(url)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = f"{url}.{uuid.uuid4().hex[:8]}.partial"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, url)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(folder)


def atomic_write_json(url: str, obj: Any, indent: int | None = 1, fs: Any = None) -> None:
    """`atomic_write` of `obj` as JSON (sorted keys; NaN and inf refused, as JSON has none)."""
    atomic_write(
        url, json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False).encode(), fs=fs
    )


def atomic_write_text(url: str, text: str, fs: Any = None) -> None:
    """`atomic_write` of UTF-8 text."""
    atomic_write(url, text.encode("utf-8"), fs=fs)


def remove(url: str) -> None:
    """Delete the file at `url` if it is there, durably (the deletion survives a power cut)."""
    fs, path = fsspec.core.url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(os.path.dirname(path))


@contextmanager
def exclusive_lock(folder: str, lock_name: str, busy: str, remote: bool = True) -> Iterator[None]:
    """Hold the exclusive lock file `lock_name` in `folder` (created if needed) while the block
    runs.

        A second holder is refused with `UserError(busy)`.  `remote=False` takes no lock on object
        stores (where a killed holder would leave its marker behind)."""
    fs, path = fsspec.core.url_to_fs(folder)
    path = path.rstrip("/")
    if isinstance(fs, LocalFileSystem):
        import fcntl

        os.makedirs(path, exist_ok=True)
        handle = open(os.path.join(path, lock_name), "a+")  # noqa: SIM115 - held for the lock's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return
    if not remote:
        yield
        return
    marker = f"{path}/{lock_name}"
    if fs.exists(marker):
        raise UserError(
            f"{busy} (if nothing is running, delete {folder.rstrip('/')}/{lock_name} and retry)"
        )
    fs.pipe_file(marker, json.dumps({"pid": os.getpid()}).encode())
    try:
        yield
    finally:
        fs.rm_file(marker)
