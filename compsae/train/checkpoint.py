"""Checkpoints: `model.safetensors` + `config.json` (the trained model, what other stages load) and
`train_state.safetensors` (everything a resume needs).  Never pickle.

Each file is written atomically (temp file + fsync + rename, or one object PUT), and each is
self-contained, so a crash *between* two files is harmless too:
- `train_state.safetensors` holds the weights as well as the optimizer state, dead-latent counters
  and RNG, and carries the checkpoint's config and the loader position as JSON in its header.  It is
  written first; a resume reads only it.
- `model.safetensors` carries the checkpoint's config (with its step) in its header, so
  `load_model` never pairs weights with a config.json of another step.
- `config.json` (the same config, for people and for finding checkpoint folders) is written last.
A kill at any instant leaves a folder that loads (the previous or the new model) and resumes.

Both headers and config.json carry content digests (sha256 of config and tensors): a load checks
the weights against them, and a checkpoint with no digest anywhere (from elsewhere, or an older
compsae) loads only when the caller trusts it (`--trust-unverified`, `trust_unverified=True`).

The config: `{"model": ModelConfig, "normalization": {"scale"} | null, "hook",
"store_manifest_hash", "split": {"fraction", "seed"}, "step", "tokens_seen", "finished",
"config_hash", "d_in", "type", ...}`."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from compsae import durable
from compsae.errors import ForeignFilesError, UserError
from compsae.files import CONFIG_FILE, MODEL_FILE, STATE_FILE, TRAIN_METRICS
from compsae.train.config import legacy_model_config
from compsae.train.models import SparseAutoencoder, build_model
from compsae.train.records import CheckpointMeta

_WEIGHT_PREFIX = "model."  # weights inside the resume state: "model.<parameter name>"
DIGEST_KEY = (
    "content_sha256"  # in config.json: the content digest of model.safetensors (see `_pack`)
)
STATE_DIGEST_KEY = "state_sha256"  # in config.json: the digest of the resume state written with it
_HEADER_LIMIT = 100 * 2**20  # a safetensors header larger than this is not one we wrote


def _write(fs: Any, path: str, data: bytes) -> None:
    """Replace `path` by `data` atomically; on failure (disk full) the old file is untouched."""
    durable.atomic_write(path, data, fs=fs)


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
        raise UserError(
            f"{where} is not a valid safetensors file ({str(e)[:80]}); delete it and retrain"
        ) from None


def _parse_header(raw: bytes) -> dict[str, Any] | None:
    try:
        header = json.loads(raw)
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def _header(data: bytes) -> dict[str, Any] | None:
    """The JSON header of safetensors bytes (8-byte length, then JSON), or None when not
    safetensors."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < n <= min(_HEADER_LIMIT, len(data) - 8):
        return None
    return _parse_header(data[8 : 8 + n])


def _metadata(data: bytes) -> dict[str, str]:
    header = _header(data) or {}
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _metadata_step(data: bytes) -> int | None:
    header = _metadata(data)
    if "meta" in header:
        return int(_unpack(header["meta"], MODEL_FILE)[0]["step"])
    return int(header["step"]) if "step" in header else None  # checkpoints of the first format


def content_digest(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """sha256 of a checkpoint file's content: `meta` and every tensor's name, dtype, shape and
    bytes. Kept inside the file's JSON metadata: a flipped or swapped byte of a weight, or an edited
    field of the metadata, is then refused on load instead of used."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_DIGEST_LEN = 64  # hex digits of a sha256


def _pack(obj: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """A file's JSON metadata prefixed by its content digest (no separator: the JSON starts with
    `{`, which no single bit flip makes of a hex digit, so a damaged prefix cannot pass for an old
    file written without one)."""
    return content_digest(tensors, obj) + json.dumps(obj, sort_keys=True)


def _unpack(text: str, where: str) -> tuple[dict[str, Any], str | None]:
    """(metadata, digest) of a `_pack`ed string; digest None for files written before digests."""
    digest, body = (
        (None, text) if text.startswith("{") else (text[:_DIGEST_LEN], text[_DIGEST_LEN:])
    )
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: its header metadata is not valid JSON; restore it or retrain")
    return obj, digest


def _check_digest(
    tensors: dict[str, torch.Tensor], text: str, where: str
) -> tuple[dict[str, Any], str | None]:
    """The metadata of a `_pack`ed string, after checking its digest against `tensors`."""
    obj, digest = _unpack(text, where)
    if digest is not None and digest != content_digest(tensors, obj):
        raise UserError(
            f"{where}: its content does not match the digest it was written with (corrupt or "
            "edited "
            "bytes); restore it or retrain"
        )
    return obj, digest


def _same_checkpoint(folder: str, step: Any, digest: Any, key: str, file: str) -> None:
    """Refuse `file` when config.json names a digest for it that the file does not carry: another
    digest at the same step (the file was replaced by another checkpoint's), or none at all (the
    digest was stripped).  Another digest at a different step is a write interrupted between the
    two files (the module docstring): the file is then newer than config.json, and fine."""
    published = read_meta(folder)
    if not isinstance(published, dict) or published.get(key) is None:
        return
    if digest is None:
        # compsae never writes a file without its digest beside a config.json that names one, at
        # any step: stripping it must not turn the content check off
        raise UserError(
            f"{folder}/{file} has no content digest though {CONFIG_FILE} names one (edited?); "
            "restore it or retrain"
        )
    if published.get("step") == step and published.get(key) != digest:
        raise UserError(
            f"{folder}/{file} is not the file {CONFIG_FILE} was written with (replaced by another "
            "checkpoint's?); restore it or retrain"
        )


_warned_unverified: set[str] = set()  # folders already warned about in this process


def _unverified(folder: str, trust_unverified: bool, warn: bool) -> None:
    """Refuse a model file that no digest vouches for (neither its header nor config.json names
    one: a checkpoint from elsewhere, or written before digests), unless the user trusts it; then
    warn (`warn`) once per folder and process."""
    where = f"{folder}/{MODEL_FILE}"
    if not trust_unverified:
        raise UserError(
            f"{where} has no content digest, in its header or in {CONFIG_FILE} (from elsewhere, "
            "or an older compsae), so its weights cannot be checked; pass --trust-unverified "
            "(Python: trust_unverified=True) to load it anyway, or re-import or retrain it"
        )
    if warn and where not in _warned_unverified:
        _warned_unverified.add(where)
        print(
            f"warning: {where} has no content digest; loaded unverified (--trust-unverified)",
            file=sys.stderr,
        )


def _published_digest_matches(weights: dict[str, torch.Tensor], published: dict[str, Any]) -> bool:
    """Whether the model digest config.json names is that of `weights` with config.json's own
    metadata (what `save_checkpoint` hashed: config.json less the digests it adds)."""
    meta = {k: v for k, v in published.items() if k not in (DIGEST_KEY, STATE_DIGEST_KEY)}
    return bool(published[DIGEST_KEY] == content_digest(weights, meta))


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_checkpoint(
    folder: str,
    model: SparseAutoencoder,
    meta: dict[str, Any],
    train_tensors: dict[str, torch.Tensor] | None = None,
    train_json: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint of `model` into `folder`; `meta` becomes config.json (needs "step").

    With `train_tensors` (optimizer state etc.) the resume state is written first, holding the
    weights, those tensors, `meta` and `train_json` (loader position etc.): see the module
    docstring."""
    fs, path = fsspec.core.url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)
    weights = _cpu(model.state_dict())
    # One metadata entry per file: safetensors writes several in no fixed order, and the files
    # must be byte-for-byte reproducible (the stage digest hashes them).
    if train_tensors is not None:
        state = {f"{_WEIGHT_PREFIX}{k}": v for k, v in weights.items()} | _cpu(train_tensors)
        resume = {
            "step": meta["step"],
            "meta": meta,
            "state": {**(train_json or {}), "step": meta["step"]},
        }
        packed_state = _pack(resume, state)
        _write(fs, f"{path}/{STATE_FILE}", st_save(state, metadata={"resume": packed_state}))
    packed = _pack(meta, weights)
    _write(fs, f"{path}/{MODEL_FILE}", st_save(weights, metadata={"meta": packed}))
    # config.json names the digests of the files it was written with: a file of the same step
    # replaced by another checkpoint's is refused on load (see `_same_checkpoint`)
    published = {
        **meta,
        DIGEST_KEY: packed[:_DIGEST_LEN],
        **({STATE_DIGEST_KEY: packed_state[:_DIGEST_LEN]} if train_tensors is not None else {}),
    }
    _write(fs, f"{path}/{CONFIG_FILE}", json.dumps(published, indent=2, sort_keys=True).encode())


def read_meta(folder: str) -> dict[str, Any] | None:
    """config.json of a checkpoint folder, or None when there is none."""
    fs, path = fsspec.core.url_to_fs(folder)
    raw = _read(fs, f"{path}/{CONFIG_FILE}")
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise UserError(
            f"{folder}/{CONFIG_FILE} is not valid JSON; delete the folder and retrain"
        ) from None


def read_resume_meta(folder: str) -> dict[str, Any] | None:
    """The config saved with the resume state (newer than config.json after a crash between the
    two), else config.json's, else None.  Reads only the state file's header."""
    fs, path = fsspec.core.url_to_fs(folder)
    try:
        with fs.open(f"{path}/{STATE_FILE}", "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = _parse_header(f.read(n)) if 0 < n <= _HEADER_LIMIT else None
    except FileNotFoundError:
        return read_meta(folder)
    resume = ((header or {}).get("__metadata__") or {}).get("resume")
    try:
        if not isinstance(resume, str):  # not a safetensors file of ours (a pickle, say)
            raise ValueError("no resume metadata")
        return _unpack(resume, f"{folder}/{STATE_FILE}")[0]["meta"]
    except (TypeError, ValueError, KeyError):
        raise UserError(
            f"{folder}/{STATE_FILE} is not a valid safetensors resume state; delete the folder or "
            "pass --force"
        ) from None


def parse_meta(meta: dict[str, Any], where: str = "the checkpoint") -> CheckpointMeta:
    """A checkpoint's metadata (config.json) as a `CheckpointMeta`; one line when it is not one."""
    try:
        return CheckpointMeta.model_validate(meta)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"]) or "metadata"
        raise UserError(
            f"{where}: {CONFIG_FILE} is not compsae checkpoint metadata ({field}: {first['msg']}); "
            "retrain or re-import it"
        ) from None


def load_model(
    folder: str,
    device: str | torch.device = "cpu",
    trust_unverified: bool = False,
    *,
    warn: bool = True,
) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """The model saved in `folder` (in eval mode, schedule at its final k and m) and its config
    (the one stored with the weights; config.json for checkpoints written before that existed).

    The weights must match a content digest (the header's, else config.json's); a checkpoint
    with no digest anywhere is refused unless `trust_unverified` (then loaded with a warning on
    stderr; `warn=False` for a reload the user was warned about already, in a worker process)."""
    fs, path = fsspec.core.url_to_fs(folder)
    data = _read(fs, f"{path}/{MODEL_FILE}")
    if data is None:
        hint = "train first" if read_meta(folder) is None else "delete the folder and retrain"
        raise UserError(f"no {MODEL_FILE} in {folder}; {hint}")
    weights = _load_tensors(data, f"{folder}/{MODEL_FILE}")
    meta = _verified_meta(folder, data, weights, trust_unverified, warn)
    return _build(weights, meta, folder).to(device).eval(), meta


def _verified_meta(
    folder: str, data: bytes, weights: dict[str, torch.Tensor], trust_unverified: bool, warn: bool
) -> dict[str, Any]:
    """The config of the model file `data` once its weights are checked against the digests of
    its header and of config.json (see `load_model`); one line when they do not match."""
    where = f"{folder}/{MODEL_FILE}"
    embedded = _metadata(data).get("meta")
    if embedded is not None:
        meta, digest = _check_digest(weights, embedded, where)
        _same_checkpoint(folder, meta.get("step"), digest, DIGEST_KEY, MODEL_FILE)
        if digest is None:  # neither the header nor config.json names one
            _unverified(folder, trust_unverified, warn)
        return meta
    published = read_meta(folder)
    if published is None:
        raise UserError(f"no checkpoint in {folder} (missing {CONFIG_FILE}); train first")
    if published.get(DIGEST_KEY) is not None:
        # a header without compsae's metadata beside a config.json naming a digest: the weights
        # must be the ones config.json was written with, whatever the header says
        if not _published_digest_matches(weights, published):
            raise UserError(
                f"{where}: its content does not match the digest {CONFIG_FILE} names (corrupt or "
                "edited bytes); restore it or retrain"
            )
        return published
    if _metadata_step(data) != published.get("step"):
        raise UserError(
            f"{folder}: {MODEL_FILE} and {CONFIG_FILE} are from different steps (interrupted "
            "write); rerun training to resume, or delete the folder"
        )
    _unverified(folder, trust_unverified, warn)
    return published


def _build(weights: dict[str, torch.Tensor], meta: dict[str, Any], where: str) -> SparseAutoencoder:
    try:
        model_cfg, d_in = legacy_model_config(meta["model"]), int(meta["d_in"])
        if d_in <= 0:
            raise ValueError(f"d_in {d_in}")
    except (KeyError, TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        first = str(e).splitlines()[0][:100] if str(e) else e.__class__.__name__
        raise UserError(
            f"{where}/{MODEL_FILE}: its metadata is not a compsae checkpoint's ({first}); "
            "retrain or re-import it"
        ) from None
    for name, t in weights.items():
        # a diverged training must not be analysed or exported as if it were a model
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(
                f"{where}/{MODEL_FILE}: weight {name} holds NaN or inf (training diverged?); "
                "retrain it, e.g. with a lower lr"
            )
    model = build_model(model_cfg, d_in)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(
            f"{where}/{MODEL_FILE} does not fit its config ({str(e).splitlines()[0][:100]})"
        ) from None
    model.reset_schedule()
    return model


# what the trainer writes in a model folder (besides the `*.partial` files of an interrupted write)
_MODEL_FOLDER_FILES = frozenset({MODEL_FILE, CONFIG_FILE, STATE_FILE, TRAIN_METRICS})


def remove_checkpoint(folder: str) -> None:
    """Delete a model folder (checkpoint and metrics): `--force` starts over.  Refused, with
    nothing deleted, when the folder holds a file the trainer did not write."""
    fs, path = fsspec.core.url_to_fs(folder)
    if not fs.exists(path):
        return
    path = path.rstrip("/")
    files = [f.rstrip("/")[len(path) + 1 :] for f in fs.find(path)]
    foreign = sorted(
        f
        for f in files
        # a `*.partial` file is compsae's only as the leftover of a killed write of its own files
        if f not in _MODEL_FOLDER_FILES and durable.partial_target(f) not in _MODEL_FOLDER_FILES
    )
    if foreign:
        raise ForeignFilesError(folder, foreign, "model folder")
    fs.rm(path, recursive=True)


@dataclass
class ResumeState:
    """Everything `train_state.safetensors` holds: weights, the other tensors (optimizer state,
    dead-latent counters, RNG), the checkpoint's config (`meta`) and JSON state (loader
    position)."""

    step: int
    meta: dict[str, Any]
    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]


def load_resume_state(folder: str) -> ResumeState | None:
    """The resume state of `folder`, or None when it has none (never trained, or a checkpoint
    written without optimizer state)."""
    fs, path = fsspec.core.url_to_fs(folder)
    data = _read(fs, f"{path}/{STATE_FILE}")
    if data is None:
        return None
    tensors = _load_tensors(data, f"{folder}/{STATE_FILE}")
    resume = _metadata(data).get("resume")
    if resume is None:
        raise UserError(
            f"{folder}/{STATE_FILE} is not a valid safetensors resume state; delete the folder or "
            "pass --force"
        )
    saved, digest = _check_digest(tensors, resume, f"{folder}/{STATE_FILE}")
    _same_checkpoint(folder, saved.get("step"), digest, STATE_DIGEST_KEY, STATE_FILE)
    weights = {
        k[len(_WEIGHT_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_WEIGHT_PREFIX)
    }
    others = {k: v for k, v in tensors.items() if not k.startswith(_WEIGHT_PREFIX)}
    return ResumeState(int(saved["step"]), saved["meta"], saved["state"], weights, others)


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as named tensors `opt.<param>.<key>` (`names`: id(param) ->
    name)."""
    out: dict[str, torch.Tensor] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                out[f"opt.{names[id(p)]}.{key}"] = t
    return out


def load_optimizer_tensors(
    opt: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor]
) -> None:
    """Inverse of `optimizer_tensors`: put the saved state back on the optimizer's parameters."""
    for group in opt.param_groups:
        for p in group["params"]:
            prefix = f"opt.{names[id(p)]}."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                opt.state[p] = {
                    k: (v if k == "step" else v.to(p.device, p.dtype)).clone()
                    for k, v in state.items()
                }
