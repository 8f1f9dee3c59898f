"""Checkpoints: `model.safetensors` + `config.json`, and `train_state.safetensors` + `.json` for
resuming.  Never pickle.  Every file is written atomically (temp file + rename, or one object PUT)
and carries the step, so a set of files from different steps is detected rather than trusted.

`config.json` is written last: `{"model": ModelConfig, "normalization": {"scale"} | null, "hook",
"store_manifest_hash", "step", "tokens_seen", "finished", "config_hash", "d_in", "type"}`."""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from compsae.errors import UserError
from compsae.train.config import ModelConfig
from compsae.train.models import SparseAutoencoder, build_model

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.safetensors"
STATE_JSON = "train_state.json"


def _write(fs: Any, path: str, data: bytes) -> None:
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # an object PUT is atomic


def _read(fs: Any, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def _load_tensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    # safetensors parses a JSON header and raw bytes only: a pickle here fails instead of running.
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise UserError(f"{where} is not a valid safetensors file ({str(e)[:80]}); delete it and retrain") from None


def _metadata_step(data: bytes) -> int | None:
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        return None
    step = header.get("__metadata__", {}).get("step")
    return int(step) if step is not None else None


def save_checkpoint(folder: str, model: SparseAutoencoder, meta: dict[str, Any],
                    train_tensors: dict[str, torch.Tensor] | None = None,
                    train_json: dict[str, Any] | None = None) -> None:
    """Write a checkpoint of `model` into `folder`; `meta` becomes config.json (needs "step").

    The resume state (optimizer tensors etc. and a JSON part) is written first and config.json last,
    so a crash part-way leaves files whose steps disagree, which `load_train_state` refuses."""
    fs, path = fsspec.core.url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)
    step = {"step": str(meta["step"])}
    if train_tensors is not None:
        _write(fs, f"{path}/{STATE_FILE}", st_save({k: v.detach().cpu().contiguous() for k, v in train_tensors.items()},
                                                  metadata=step))
        _write(fs, f"{path}/{STATE_JSON}", json.dumps({**(train_json or {}), "step": meta["step"]}).encode())
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _write(fs, f"{path}/{MODEL_FILE}", st_save(weights, metadata=step))
    _write(fs, f"{path}/{CONFIG_FILE}", json.dumps(meta, indent=2, sort_keys=True).encode())


def read_meta(folder: str) -> dict[str, Any] | None:
    """config.json of a checkpoint folder, or None when there is none."""
    fs, path = fsspec.core.url_to_fs(folder)
    raw = _read(fs, f"{path}/{CONFIG_FILE}")
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise UserError(f"{folder}/{CONFIG_FILE} is not valid JSON; delete the folder and retrain") from None


def load_model(folder: str, device: str | torch.device = "cpu") -> tuple[SparseAutoencoder, dict[str, Any]]:
    """The model saved in `folder` (in eval mode, schedule at its final k and m) and its config.json."""
    meta = read_meta(folder)
    if meta is None:
        raise UserError(f"no checkpoint in {folder} (missing {CONFIG_FILE}); train first")
    fs, path = fsspec.core.url_to_fs(folder)
    data = _read(fs, f"{path}/{MODEL_FILE}")
    if data is None:
        raise UserError(f"{folder} has {CONFIG_FILE} but no {MODEL_FILE}; delete the folder and retrain")
    weights = _load_tensors(data, f"{folder}/{MODEL_FILE}")
    if _metadata_step(data) != meta.get("step"):
        raise UserError(f"{folder}: {MODEL_FILE} and {CONFIG_FILE} are from different steps (interrupted write); "
                        "rerun training to resume, or delete the folder")
    model = build_model(ModelConfig.model_validate(meta["model"]), int(meta["d_in"]))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"{folder}/{MODEL_FILE} does not fit its config ({str(e).splitlines()[0][:100]})") from None
    model.reset_schedule()
    return model.to(device).eval(), meta


def load_weights(folder: str) -> dict[str, torch.Tensor]:
    """The raw tensors of `folder`/model.safetensors (refusing anything that is not safetensors)."""
    fs, path = fsspec.core.url_to_fs(folder)
    data = _read(fs, f"{path}/{MODEL_FILE}")
    if data is None:
        raise UserError(f"no {MODEL_FILE} in {folder}; train first")
    return _load_tensors(data, f"{folder}/{MODEL_FILE}")


def remove_checkpoint(folder: str) -> None:
    """Delete a model folder (checkpoint and metrics): `--force` starts over."""
    fs, path = fsspec.core.url_to_fs(folder)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def load_train_state(folder: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The resume state `(tensors, json)` of `folder`, or None when it has none.  Refuses a set of
    files that do not all come from the same step."""
    meta = read_meta(folder)
    fs, path = fsspec.core.url_to_fs(folder)
    data = _read(fs, f"{path}/{STATE_FILE}")
    raw_json = _read(fs, f"{path}/{STATE_JSON}")
    if meta is None or data is None or raw_json is None:
        return None
    tensors = _load_tensors(data, f"{folder}/{STATE_FILE}")
    state = json.loads(raw_json)
    model_data = _read(fs, f"{path}/{MODEL_FILE}")
    steps = {meta.get("step"), state.get("step"), _metadata_step(data),
             _metadata_step(model_data) if model_data is not None else None}
    if len(steps) != 1:
        raise UserError(f"the checkpoint in {folder} mixes files of different steps (interrupted write); "
                        "delete the folder or pass --force to start over")
    return tensors, state


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as named tensors `opt.<param>.<key>` (`names`: id(param) -> name)."""
    out: dict[str, torch.Tensor] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                out[f"opt.{names[id(p)]}.{key}"] = t
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_tensors`: put the saved state back on the optimizer's parameters."""
    for group in opt.param_groups:
        for p in group["params"]:
            prefix = f"opt.{names[id(p)]}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                opt.state[p] = {k: (v if k == "step" else v.to(p.device, p.dtype)).clone() for k, v in state.items()}
