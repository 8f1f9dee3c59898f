"""Models of a train stage reused from its earlier runs: a rerun whose config changes one model's
settings trains that model only.

The stage folder is named by the hash of the whole train config, so changing one model's `k`
gives a new folder.  Each other model whose training hash (`training_hash`: its model and
training settings, hook and store) matches a finished checkpoint in an earlier done folder of the
stage is taken from there: its files are hard-linked (the safetensors files, which are only ever
replaced, never written in place) or copied byte for byte, and its record is carried over from the
earlier `stage.json`.  Every model gets one line saying which way it went and why.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from compsae import durable
from compsae.errors import UserError
from compsae.files import CONFIG_FILE, MODEL_FILE, STATE_FILE, TRAIN_METRICS
from compsae.stages import (
    config_changes,
    config_for_hash,
    describe_changes,
    join,
    read_record,
    semantic_part,
)
from compsae.train.checkpoint import read_meta, read_resume_meta
from compsae.train.config import ModelConfig, TrainConfig

# Settings that change how often things are written, never the weights: a resume may change them.
NOT_IN_RESUME_HASH = {"log_every", "checkpoint_every"}


def training_hash(
    model_cfg: ModelConfig, train_cfg: TrainConfig, hook: str, store_hash: str
) -> str:
    """What a checkpoint must match to be resumed: model, weight-relevant training settings,
    data."""
    train = {k: v for k, v in config_for_hash(train_cfg).items() if k not in NOT_IN_RESUME_HASH}
    payload = {
        "model": model_cfg.model_dump(mode="json"),
        "train": train,
        "hook": hook,
        "store": store_hash,
    }
    return durable.json_digest(payload)


# Copied in the order the trainer writes them: config.json (what marks a model folder) comes last,
# so a copy cut short is an unfinished folder, never a finished one with a file missing.
_COPY_ORDER = (STATE_FILE, MODEL_FILE, TRAIN_METRICS, CONFIG_FILE)
# Files only ever replaced whole (`durable.atomic_write`), never changed in place: safe to share.
_LINKABLE = frozenset({STATE_FILE, MODEL_FILE})


@dataclass(frozen=True)
class ModelPlan:
    """What the train stage does with one model: `source` is the earlier model folder it is taken
    from (None: it trains, or resumes, here), `record` the earlier record carried over, `line`
    what the run prints about it."""

    name: str
    source: str | None
    record: dict[str, Any] | None
    line: str


def finished_checkpoint(folder: str, config_hash: str) -> bool:
    """Whether `folder` holds a finished checkpoint of training hash `config_hash` whose published
    files are complete (the condition `run.train_one` reuses a checkpoint on)."""
    try:
        state = read_resume_meta(folder)
        published = read_meta(folder)
    except (UserError, OSError, ValueError):  # an unreadable folder is not one to reuse
        return False
    return bool(
        state is not None
        and published is not None
        and state.get("config_hash") == config_hash
        and state.get("finished")
        and published.get("step") == state.get("step")
    )


def _identity(meta: dict[str, Any]) -> dict[str, Any]:
    """The fields of a checkpoint's metadata that decide what was trained, as plain JSON: the
    model's own settings (its training overrides are in `train`, applied), the training settings
    that change weights, the hook and the store."""
    model = {k: v for k, v in (meta.get("model") or {}).items() if k != "train"}
    train = semantic_part(meta.get("train") or {})
    train = {k: v for k, v in train.items() if k not in NOT_IN_RESUME_HASH}
    return {
        **model,
        **train,
        "hook": meta.get("hook"),
        "store": meta.get("store_manifest_hash"),
    }


def why_training(new_meta: dict[str, Any], earlier_meta: dict[str, Any] | None) -> str:
    """`k changed (4 -> 8)`: how a model's settings differ from its last finished training, or
    why it has none to compare with."""
    if earlier_meta is None:
        return "no earlier run of it"
    changes = config_changes(_identity(earlier_meta), _identity(new_meta))
    return describe_changes(changes) or "its training hash changed"


def plan_model(
    name: str,
    folder: str,
    config_hash: str,
    new_meta: dict[str, Any],
    earlier: tuple[str, ...],
    force: bool,
) -> ModelPlan:
    """Where model `name` (training hash `config_hash`, checkpoint metadata `new_meta` up to its
    step) comes from: its own folder when it finished there, an earlier stage folder's copy of
    the same training, or a training run now."""
    if force:
        return ModelPlan(name, None, None, f"training {name}: --force starts it over")
    if finished_checkpoint(folder, config_hash):
        return ModelPlan(name, None, None, f"reused {name} (unchanged)")
    last_meta = None
    for stage_folder in earlier:
        source = join(stage_folder, name)
        if finished_checkpoint(source, config_hash):
            record = read_record(stage_folder) or {}
            carried = ((record.get("outputs") or {}).get("models") or {}).get(name)
            return ModelPlan(name, source, carried, f"reused {name} (unchanged)")
        if last_meta is None:
            try:
                last_meta = read_meta(source)
            except (UserError, OSError):  # an unreadable earlier folder: nothing to compare
                last_meta = None
    try:
        own = read_resume_meta(folder)
    except (UserError, OSError):  # train_one reports it
        own = None
    if own is not None and own.get("config_hash") == config_hash:
        return ModelPlan(name, None, None, f"training {name}: resuming at step {own.get('step')}")
    return ModelPlan(name, None, None, f"training {name}: {why_training(new_meta, last_meta)}")


def copy_model_folder(source: str, target: str) -> None:
    """Put the checkpoint files of `source` into `target`, byte for byte: hard links where both
    are on one local disk, copies otherwise; each file lands atomically, config.json last."""
    src_fs, src = fsspec.core.url_to_fs(source)
    dst_fs, dst = fsspec.core.url_to_fs(target)
    dst_fs.makedirs(dst, exist_ok=True)
    local = isinstance(src_fs, LocalFileSystem) and isinstance(dst_fs, LocalFileSystem)
    for file in _COPY_ORDER:
        if not src_fs.exists(f"{src}/{file}"):
            continue
        if local:
            _place_local(f"{src}/{file}", f"{dst}/{file}", link=file in _LINKABLE)
        else:
            durable.atomic_write(f"{dst}/{file}", src_fs.cat_file(f"{src}/{file}"), fs=dst_fs)


def _place_local(src: str, dst: str, link: bool) -> None:
    """`src` at `dst` (replacing what is there): a hard link when `link` and the disk allows it,
    else a copy; through a temporary name, so `dst` is never half there."""
    tmp = f"{dst}.reuse.partial"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        if link:
            try:
                os.link(src, tmp)
            except OSError:  # another disk, or links not allowed: copy it
                shutil.copyfile(src, tmp)
        else:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    durable.fsync_dir(os.path.dirname(dst))
