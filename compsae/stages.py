"""Stage folders, their hashes and completion records: what makes stages reusable.

A stage writes into `<runs_root>/<pipeline>/<stage>-<hash12>/`.  The hash covers the stage's own
config and the records of the stages it reads, so a changed train config reruns train and analyze
but reuses the harvest.  `stage.json` is written last (atomically): its presence means *done*.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import fsspec
from pydantic import BaseModel, ConfigDict

from compsae import __version__, durable
from compsae.files import STAGE_LOCK, STAGE_RECORD

RECORD = STAGE_RECORD

Outputs = TypeVar("Outputs", bound=BaseModel)


class StageInput(BaseModel):
    """An input stage as a record names it: its hash and the folder it was read from."""

    model_config = ConfigDict(extra="allow")

    hash: str
    path: str | None = None


class StageRecord(BaseModel, Generic[Outputs]):
    """`stage.json`, typed: `StageRecord[TrainOutputs].model_validate(read_record(folder))`.
    `config` stays the stage config's JSON (its model depends on the stage and the source kind);
    unknown keys (older or newer writers) are kept, so every record written so far still reads."""

    model_config = ConfigDict(extra="allow")

    stage: str
    hash: str
    folder: str | None = None
    config: dict[str, Any]
    inputs: dict[str, StageInput] = {}
    outputs: Outputs
    finished_at: str | None = None
    version: str | None = None


# Fields that change how fast a stage runs, never what it writes: left out of the hash.
NON_SEMANTIC = {
    "device",
    "writer_threads",
    "workers",
    "scheduler",
    "progress",
    "num_threads",
    "prefetch",
    "threads_per_worker",
    "log",
    "wandb_project",
    "wandb_entity",
    "compile",
}


def semantic_part(data: Any) -> Any:
    """JSON config data without the fields that cannot change a stage's outputs (at any depth)."""
    if isinstance(data, dict):
        return {k: semantic_part(v) for k, v in data.items() if k not in NON_SEMANTIC}
    if isinstance(data, list):
        return [semantic_part(v) for v in data]
    return data


def config_for_hash(cfg: BaseModel) -> dict[str, Any]:
    """The stage config as plain JSON data, without fields that cannot change its outputs."""
    return semantic_part(cfg.model_dump(mode="json"))


_UNSET = object()


def config_changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Where two JSON configs differ, as (dotted field path, old value, new value), in key order;
    a field one of them lacks has the value `UNSET` there.  Lists are compared whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            out += config_changes(old.get(key, _UNSET), new.get(key, _UNSET), path)
        return out
    return [] if old == new else [(prefix, old, new)]


def _shown(value: Any, limit: int = 40) -> str:
    """A config value as a message shows it: JSON, cut to `limit` characters."""
    text = "unset" if value is _UNSET else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """`k changed (4 -> 8)` for the first change, `and N more` for the others; "" when none."""
    if not changes:
        return ""
    path, old, new = changes[0]
    more = f" and {len(changes) - 1} more" if len(changes) > 1 else ""
    return f"{path} changed ({_shown(old)} -> {_shown(new)}){more}"


def stage_hash(stage: str, cfg: BaseModel, inputs: dict[str, dict[str, Any]]) -> str:
    """12-hex hash of the stage name, its config and its input records' hashes and digests."""
    payload = {
        "stage": stage,
        "config": config_for_hash(cfg),
        "inputs": {
            name: {"hash": rec["hash"], "digest": rec.get("outputs", {}).get("digest")}
            for name, rec in sorted(inputs.items())
        },
    }
    return durable.json_digest(payload, durable.NAME_DIGITS)


def join(root: str, *parts: str) -> str:
    """Join URL or path parts with '/'."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def stage_dir(runs_root: str, pipeline: str, stage: str, digest: str) -> str:
    """The folder of one stage run."""
    return join(runs_root, pipeline, f"{stage}-{digest}")


def read_record(folder: str) -> dict[str, Any] | None:
    """The completion record of a stage folder, or None when the stage is not done there; its
    paths resolved from `folder` (see `resolve_record`)."""
    fs, path = fsspec.core.url_to_fs(folder)
    target = f"{path}/{RECORD}"
    if not fs.exists(target):
        return None
    try:
        record = json.loads(fs.cat_file(target))
    except (ValueError, OSError):
        return None
    return resolve_record(record, folder) if isinstance(record, dict) else None


# A record's paths under its runs root are written relative to its own folder and start with
# "./" or "../", so that a reader can tell them from other strings (hooks, model types, digests).
RELATIVE_PATHS = "record-folder"


def _absolute(folder: str) -> str:
    """`folder` in a form that does not depend on the working folder (local paths made absolute,
    URLs as they are)."""
    folder = folder.rstrip("/") or "/"
    if "://" in folder:
        return folder
    return os.path.abspath(folder)


def _normjoin(folder: str, rel: str) -> str:
    """`rel` (relative to `folder`) joined onto it, `.` and `..` segments resolved."""
    proto, sep, rest = folder.partition("://")
    if not sep:
        return posixpath.normpath(posixpath.join(folder, rel))
    return f"{proto}://" + posixpath.normpath(posixpath.join(rest, rel)).lstrip("/")


def _map_paths(record: dict[str, Any], fn: Any) -> dict[str, Any]:
    """`record` with `fn` applied to every string of its inputs and outputs."""

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return fn(v)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return {
        **record,
        "inputs": walk(record.get("inputs") or {}),
        "outputs": walk(record["outputs"]),
    }


def resolve_record(record: dict[str, Any], folder: str) -> dict[str, Any]:
    """`record` read from `folder`, with its paths usable from this process whatever its working
    folder: the one resolver of record paths (runner, stages, status, report and verify).

    Records of this version hold paths relative to their own folder ("./probes.json",
    "../harvest-…/store.zarr"); those are joined onto `folder`.  Older records hold paths as the
    writing process saw them (relative to its working folder, or absolute): those under the runs
    root they were written in are moved under the one `folder` lies in (a moved runs root, or a
    record read from another working folder); other paths (a store placed elsewhere, s3) stay."""
    if not isinstance(record.get("outputs"), dict):
        return record
    here = _absolute(folder)
    if record.get("paths") == RELATIVE_PATHS:

        def join_here(v: str) -> str:
            return _normjoin(here, v) if v.startswith(("./", "../")) else v

        return {**_map_paths(record, join_here), "folder": here}
    return relocated(record, here)


def relative_record(record: dict[str, Any], folder: str, runs_root: str) -> dict[str, Any]:
    """`record` as it is written into `folder`: its paths under `runs_root` (in the form the
    stages gave them, or absolute) made relative to `folder`, so that the record reads the same
    from any working folder and after the runs root is moved (see `resolve_record`)."""
    roots = {runs_root.rstrip("/") or "/", _absolute(runs_root)}
    here = _absolute(folder)

    def rel(v: str) -> str:
        if not any(v == r or v.startswith(r.rstrip("/") + "/") for r in roots):
            return v
        out = posixpath.relpath(_absolute(v), here) if "://" not in v else _url_relpath(v, here)
        return out if out.startswith("..") else f"./{out}"

    return {**_map_paths(record, rel), "paths": RELATIVE_PATHS}


def _url_relpath(url: str, folder: str) -> str:
    """`url` relative to `folder`, both URLs of one file system."""
    return posixpath.relpath("/" + url.partition("://")[2], "/" + folder.partition("://")[2])


def relocated(record: dict[str, Any], folder: str) -> dict[str, Any]:
    """`record` (written by an older version, paths as its writer saw them) as seen from `folder`,
    where it now lies: a runs root moved or copied elsewhere (to another disk, another machine)
    keeps its stages reusable.  Paths under the runs root the record was written in are rewritten
    under the one it is read from; paths outside it (a store the user placed elsewhere, s3) stay as
    they are."""
    written_in = record.get("folder")
    if not isinstance(written_in, str) or written_in.rstrip("/") == folder.rstrip("/"):
        return record
    old_root, new_root = _runs_root_of(written_in), _runs_root_of(folder)
    if old_root is None or new_root is None:
        return record

    def move(v: Any) -> Any:
        if isinstance(v, str) and (v == old_root or v.startswith(old_root + "/")):
            return new_root + v[len(old_root) :]
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, list):
            return [move(x) for x in v]
        return v

    return {**move(record), "folder": folder}


def _runs_root_of(folder: str) -> str | None:
    """The runs root of a stage folder `<runs_root>/<pipeline>/<stage>-<hash>`."""
    parts = folder.rstrip("/").rsplit("/", 2)
    return parts[0] if len(parts) == 3 and parts[0] else None


def write_record(folder: str, record: dict[str, Any]) -> None:
    """Write `stage.json` atomically (see `durable.atomic_write`)."""
    fs, path = fsspec.core.url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)
    durable.atomic_write(
        f"{path}/{RECORD}", json.dumps(record, indent=2, sort_keys=True).encode(), fs=fs
    )


def invalidate_record(folder: str) -> None:
    """Remove a stage's completion record (durably) before its outputs are redone, so a redo killed
    half-way leaves a stage that is not done instead of a record over half-written outputs."""
    durable.remove(join(folder, RECORD))


def make_record(
    stage: str,
    digest: str,
    cfg: BaseModel,
    inputs: dict[str, dict[str, Any]],
    outputs: BaseModel | dict[str, Any],
    folder: str | None = None,
) -> dict[str, Any]:
    """The record a finished stage leaves behind (`folder`: where it is written, so that a moved
    runs root can be recognised, see `relocated`)."""
    return {
        "stage": stage,
        "hash": digest,
        "folder": folder,
        "config": cfg.model_dump(mode="json"),
        "inputs": {k: {"hash": v["hash"], "path": v.get("path")} for k, v in inputs.items()},
        "outputs": outputs.model_dump(mode="json") if isinstance(outputs, BaseModel) else outputs,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "version": __version__,
    }


@dataclass
class StageStatus:
    """Where a stage of a pipeline stands."""

    stage: str
    state: Literal["done", "stale", "missing", "waiting"]
    path: str | None
    hash: str | None
    record: dict[str, Any] | None = None
    note: str = ""


def done_folders(runs_root: str, pipeline: str, stage: str) -> list[str]:
    """Folders of this stage (any hash) that hold a completion record, newest first."""
    fs, path = fsspec.core.url_to_fs(join(runs_root, pipeline))
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if (
            entry["type"] == "directory"
            and name.startswith(f"{stage}-")
            and fs.exists(f"{entry['name']}/{RECORD}")
        ):
            found.append((entry.get("mtime", 0) or 0, entry["name"]))
    return [name for _, name in sorted(found, reverse=True)]


@contextmanager
def stage_lock(folder: str, stage: str) -> Iterator[None]:
    """Refuse a second run of the same stage folder while one is going (local folders)."""
    with durable.exclusive_lock(
        folder,
        STAGE_LOCK,
        f"another {stage} is running in {folder}; wait for it to finish",
        remote=False,
    ):
        yield
