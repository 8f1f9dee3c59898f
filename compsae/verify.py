"""`compsae verify`: check a store, a checkpoint or a whole run folder, one line per problem.

A run folder is walked for
- activation stores (every checksum, the metadata digests; `deep`: the statistics recomputed),
- stage records (`stage.json`): valid, in the folder of their own hash, their inputs still the
  records they were made from, their outputs present and (stores, model weights) the very bytes
  the record was written for,
- checkpoints (`model.safetensors` + `config.json`): loadable, finite, both files of one step,
  the weights those a content digest names (none at all is a problem unless trusted).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import fsspec

from compsae import durable
from compsae.errors import UserError

MAX_DEPTH = 8  # run folders are <runs_root>/<pipeline>/<stage>-<hash>/<model>: deeper is not ours


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _folders(fs: Any, path: str, depth: int = 0) -> Iterator[tuple[str, set[str]]]:
    """(folder, names in it) for `path` and the folders below it, stores not entered."""
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    names = {_name(e["name"]) for e in entries}
    yield path, names
    if "zarr.json" in names or depth >= MAX_DEPTH:
        return
    for e in sorted(entries, key=lambda e: e["name"]):
        if e["type"] == "directory" and not _name(e["name"]).startswith("."):
            yield from _folders(fs, e["name"].rstrip("/"), depth + 1)


def verify_path(
    url: str, deep: bool = False, trust_unverified: bool = False
) -> tuple[list[str], dict[str, int]]:
    """Problems found under `url` (a store, a checkpoint folder or any folder holding them) and
    counts of what was checked: {"stores", "checkpoints", "records"}.  A checkpoint without any
    content digest is a problem unless `trust_unverified` (then a warning)."""
    fs, path = fsspec.core.url_to_fs(url)
    # `or "/"`: stripping the file-system root's slash would leave "" (the working folder)
    path = path.rstrip("/") or "/"
    if not fs.exists(path):
        raise UserError(f"nothing at {url}; give a store, a checkpoint folder or a run folder")
    if not fs.isdir(path):
        raise UserError(f"{url} is a file; give a store, a checkpoint folder or a run folder")
    root = url.rstrip("/") or "/"
    problems: list[str] = []
    counts = {"stores": 0, "checkpoints": 0, "records": 0}
    checked_stores: set[str] = set()
    for folder, names in _folders(fs, path):
        where = root + folder[len(path) :]
        if "zarr.json" in names:
            counts["stores"] += 1
            checked_stores.add(where)
            problems += store_problems(where, deep)
        if "model.safetensors" in names or {"config.json", "train_state.safetensors"} <= names:
            counts["checkpoints"] += 1
            problems += checkpoint_problems(where, trust_unverified)
        if "stage.json" in names:
            counts["records"] += 1
            more, store = record_problems(where)
            problems += more
            if store and store not in checked_stores and not store.startswith(root + "/"):
                checked_stores.add(store)  # a harvest into harvest.store, outside the run folder
                counts["stores"] += 1
                problems += store_problems(store, deep)
    if not any(counts.values()):
        raise UserError(f"{url} holds no compsae store, checkpoint or stage record")
    return problems, counts


def store_problems(url: str, deep: bool = False) -> list[str]:
    """Problems of the activation store at `url`."""
    from compsae.store import ActivationStore

    try:
        store = ActivationStore.open(url)
    except UserError as e:
        return [str(e)]
    if not store.complete:
        n_done = len(store.done_shards())
        return [
            f"store {url}: incomplete, {n_done} of {store.n_shards} shards written (harvest "
            "interrupted?); "
            "rerun the harvest to finish it"
        ]
    try:
        return store.verify(deep=deep)
    finally:
        store.close()


def checkpoint_problems(folder: str, trust_unverified: bool = False) -> list[str]:
    """Problems of the checkpoint in `folder`: whatever `load_model` refuses (weights that do not
    match a digest, no digest at all unless `trust_unverified`), and files of different steps."""
    from compsae.train.checkpoint import load_model, read_meta

    try:
        _, meta = load_model(folder, trust_unverified=trust_unverified)
        published = read_meta(folder)
    except UserError as e:
        return [str(e)]
    if published is not None and published.get("step") != meta.get("step"):
        return [
            f"{folder}: config.json (step {published.get('step')}) and model.safetensors (step "
            f"{meta.get('step')}) are of different steps; rerun training to finish the checkpoint"
        ]
    return []


def _read_json(fs: Any, path: str) -> Any:
    return json.loads(fs.cat_file(path))


def record_problems(folder: str) -> tuple[list[str], str | None]:
    """Problems of the stage record in `folder`, and the URL of the store it names (harvest)."""
    from compsae.stages import RECORD, read_record, resolve_record

    fs, path = fsspec.core.url_to_fs(folder)
    where = f"{folder}/{RECORD}"
    try:
        record = _read_json(fs, f"{path}/{RECORD}")
    except (ValueError, OSError) as e:
        return [
            f"{where} is not valid JSON ({e.__class__.__name__}); rerun the stage with --force"
        ], None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("outputs"), dict)
        or "hash" not in record
    ):
        return [
            f"{where} is not a stage record (no hash or outputs); rerun the stage with --force"
        ], None
    # its paths as they lie now: whatever the working folder, and after a runs root was moved
    record = resolve_record(record, folder)
    problems = []
    stage, digest, outputs = record.get("stage"), str(record["hash"]), record["outputs"]
    if _name(folder) != f"{stage}-{digest}":
        problems.append(
            f"{where} is the record of {stage}-{digest}, not of this folder (copied?); "
            "rerun the stage with --force"
        )
    for name, spec in (record.get("inputs") or {}).items():
        source = spec.get("path") if isinstance(spec, dict) else None
        upstream = read_record(source) if source else None
        if upstream is None or upstream.get("hash") != spec.get("hash"):
            problems.append(
                f"{where}: its {name} input {source} is gone or was redone since; rerun this stage"
            )
    for rel in _listed_files(outputs.get("files")):
        if not _output_exists(fs, path, rel):
            problems.append(
                f"{where}: output {_shown(rel, path)} is missing; rerun the stage with --force"
            )
    store = outputs.get("store") if stage == "harvest" else None
    if isinstance(store, str):
        problems += _store_matches(where, store, outputs.get("digest"))
    for name, model in (outputs.get("models") or {}).items() if stage == "train" else ():
        problems += _model_matches(where, name, model)
    return problems, store if isinstance(store, str) else None


def _output_exists(fs: Any, folder: str, name: str) -> bool:
    """Whether the output `name` of a record is there: a name relative to the stage folder, or a
    path (as `resolve_record` gives it) checked where it lies."""
    if name.startswith("/") or "://" in name:
        other, target = fsspec.core.url_to_fs(name)
        return bool(other.exists(target))
    return bool(fs.exists(f"{folder}/{name}"))


def _shown(name: str, folder: str) -> str:
    """An output's name as a problem line gives it: relative to its stage folder when inside."""
    _, target = fsspec.core.url_to_fs(name) if "://" in name else (None, name)
    inside = folder.rstrip("/") + "/"
    return target[len(inside) :] if target.startswith(inside) else name


def _listed_files(files: Any) -> Iterator[str]:
    """File names in a record's "files" output (a dict or list of names, nested): relative to
    the stage folder, or paths."""
    if isinstance(files, str):
        if files:
            yield files
    elif isinstance(files, dict):
        for v in files.values():
            yield from _listed_files(v)
    elif isinstance(files, list):
        for v in files:
            yield from _listed_files(v)


def _store_matches(where: str, url: str, digest: Any) -> list[str]:
    from compsae.store import ActivationStore, manifest_digest, store_exists

    if not store_exists(url):
        return [f"{where}: its store {url} is missing; rerun the harvest with --force"]
    try:
        got = manifest_digest(ActivationStore.open(url).manifest)
    except UserError:
        return []  # reported when the store itself is checked
    if got != digest:
        return [
            f"{where}: the store at {url} is not the one this record was written for (manifest "
            "digest "
            f"{got} != {digest}); rerun the harvest with --force"
        ]
    return []


def _model_matches(where: str, name: str, model: Any) -> list[str]:
    if not isinstance(model, dict) or not isinstance(model.get("path"), str):
        return [f"{where}: model {name!r} has no path; rerun training with --force"]
    fs, path = fsspec.core.url_to_fs(model["path"])
    try:
        weights = fs.cat_file(f"{path}/model.safetensors")
    except FileNotFoundError:
        return [
            f"{where}: model {name}: {model['path']}/model.safetensors is missing; rerun training "
            "with --force"
        ]
    expect = model.get("model_digest")
    if expect is not None and durable.digest(weights) != expect:
        return [
            f"{where}: model {name}: {model['path']}/model.safetensors is not the file this record "
            "was written "
            "for (replaced or retrained since); rerun training with --force"
        ]
    return []
