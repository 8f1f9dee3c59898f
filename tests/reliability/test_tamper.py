"""Tamper suite: mutate one file of a finished store or checkpoint, then read it as the stages do.

For every store and checkpoint file, hypothesis draws mutations: flip a bit, truncate, swap with a
sibling file, replace with the same file of another store (checkpoint) of the same shape, or edit a
field of a JSON metadata file to another valid value.  The outcome must be either a one-line
`UserError` naming the store (checkpoint) and, for a file of one hook, that hook — or results
bitwise identical to the untouched copy's (the file was not one the readers use).  Anything else (a
silently different result, a traceback) fails the test.  The counts are printed at the end:
    TAMPER tried=<n> caught=<n> identical=<n> (store ... / checkpoint ...)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compsae.errors import UserError
from compsae.store import ActivationStore, StoreLayout
from compsae.store.activation_store import FORMAT, LEGACY_FORMAT
from compsae.train.checkpoint import load_model, load_resume_state, save_checkpoint
from compsae.train.config import make_model_config
from compsae.train.models import build_model

pytestmark = pytest.mark.reliability

HOOKS = {"h.a": 16, "h.b": 8}
LAYOUT = StoreLayout(chunk_rows=64, shard_rows=256)
N_ROWS = 1536  # 6 shards of 4 chunks
KINDS = ["flip", "truncate", "swap", "replace", "edit"]
COUNTS: dict[str, dict[str, int]] = {"store": {}, "checkpoint": {}}


def _make_store(url: str, seed: int) -> None:
    st_ = ActivationStore.create(url, HOOKS, N_ROWS, LAYOUT, {"config_hash": "tamper"})
    rng = np.random.default_rng(seed)
    for s in range(st_.n_shards):
        lo, hi = st_.shard_range(s)
        rows = np.arange(lo, hi)
        st_.write_shard(
            s,
            {h: rng.normal(size=(hi - lo, d)) for h, d in HOOKS.items()},
            rng.integers(0, 50, hi - lo),
            rows // 32,
            rows % 32,
        )
    st_.finalize()


def _make_checkpoint(folder: str, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = make_model_config(type="topk", n_latents=32, k=4)
    model = build_model(cfg, 16)
    meta = {
        "model": cfg.model_dump(mode="json"),
        "d_in": 16,
        "hook": "h.a",
        "step": 7,
        "tokens_seen": 700,
        "finished": True,
        "config_hash": "tamper",
        "normalization": {"scale": 1.5},
    }
    save_checkpoint(
        folder, model, meta, train_tensors={"opt.step": torch.tensor(7.0)}, train_json={"epoch": 0}
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tamper")
    for name, seed in (("a", 0), ("b", 1)):
        _make_store(str(root / f"{name}.zarr"), seed)
        _make_checkpoint(str(root / f"ckpt_{name}"), seed)
    store_files = sorted(
        str(p.relative_to(root / "a.zarr"))
        for p in (root / "a.zarr").rglob("*")
        if p.is_file() and p.name != ".compsae.lock"
    )
    ckpt_files = sorted(p.name for p in (root / "ckpt_a").iterdir() if p.is_file())
    return {
        "root": root,
        "store_files": store_files,
        "ckpt_files": ckpt_files,
        "store_result": store_result(str(root / "a.zarr")),
        "ckpt_result": checkpoint_result(str(root / "ckpt_a")),
    }


# -- what the stages read
# ----------------------------------------------------------------------------


def store_result(url: str) -> str:
    """Digest of everything train and analyze take from a store."""
    store = ActivationStore.open(url)
    h = hashlib.sha256(json.dumps([store.hooks, store.n_rows, store.layout.dtype]).encode())
    for hook in store.hooks:
        for c in range(store.n_chunks):
            h.update(np.ascontiguousarray(store.read_chunk_raw(hook, c)).tobytes())
        s = store.stats(hook)
        h.update(
            json.dumps([s["count"], s["mean"].tolist(), s["var"].tolist(), s["mean_norm"]]).encode()
        )
    for col in (store.tokens, store.seq_id, store.pos):
        h.update(np.ascontiguousarray(col).tobytes())
    store.close()
    return h.hexdigest()


def checkpoint_result(folder: str) -> str:
    """Digest of what analyze / export load (model and metadata) and what a resume loads."""
    model, meta = load_model(folder)
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.contiguous().numpy().tobytes())
    state = load_resume_state(folder)
    if state is not None:
        h.update(json.dumps([state.step, state.meta, state.state], sort_keys=True).encode())
        for name, t in sorted({**state.weights, **state.tensors}.items()):
            h.update(name.encode() + t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- mutations
# -----------------------------------------------------------------------------------------


def _leaves(node: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaves(v, (*path, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaves(v, (*path, i))]
    return [path]


def _other_valid(value: Any, choice: int) -> Any:
    """Another value of the same type, one a careless edit would plausibly write."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return [value + 1, value * 2, max(0, value - 1), value // 2][choice % 4]
    if isinstance(value, float):
        return [value * 2, value + 1.0, value / 2, -value][choice % 4]
    if isinstance(value, str):
        swaps = {
            "float16": "bfloat16",
            "bfloat16": "float16",
            "float32": "float16",
            "int32": "int64",
            "int64": "int32",
            "little": "big",
            "zstd": "blosc",
            "uint8": "int8",
            "float64": "float32",
            FORMAT: LEGACY_FORMAT,
        }  # a store's format edited back to 1, whose checks are fewer
        return swaps.get(value, value + "x")
    return 0 if value is None else None


def _siblings(target: Path, root: Path) -> list[Path]:
    """Files of the same kind beside `target`: the other chunk files of its array (store), the
    other files of the folder (checkpoint)."""
    if (
        target.name == "zarr.json"
        or target.name.endswith((".json", ".lock"))
        and target.parent != root
    ):
        return []
    array = target.parent
    while array != root and not (array / "zarr.json").exists():
        array = array.parent
    pool = (array / "c").rglob("*") if array != root else root.iterdir()
    return sorted(p for p in pool if p.is_file() and p != target and not p.name.endswith(".lock"))


def mutate(target: Path, kind: str, sibling_of: Path, other: Path, data: st.DataObject) -> bool:
    """Apply one mutation to `target` (in the copy `sibling_of` roots; `other` is the same path in
    another store/checkpoint).  False when this kind does not apply to this file."""
    raw = target.read_bytes()
    if kind == "flip":
        if not raw:
            return False
        pos = data.draw(st.integers(0, len(raw) - 1), label="byte")
        bit = data.draw(st.integers(0, 7), label="bit")
        b = bytearray(raw)
        b[pos] ^= 1 << bit
        target.write_bytes(bytes(b))
    elif kind == "truncate":
        if not raw:
            return False
        target.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="keep")])
    elif kind == "swap":
        siblings = _siblings(target, sibling_of)
        if not siblings:
            return False
        sib = data.draw(st.sampled_from(siblings), label="sibling")
        a, b = target.read_bytes(), sib.read_bytes()
        target.write_bytes(b)
        sib.write_bytes(a)
    elif kind == "replace":
        if not other.exists() or other.read_bytes() == raw:
            return False
        target.write_bytes(other.read_bytes())
    elif kind == "edit":
        if not target.name.endswith(".json"):
            return False
        doc = json.loads(raw)
        leaves = [p for p in _leaves(doc) if p]
        if not leaves:
            return False
        path = data.draw(st.sampled_from(leaves), label="field")
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = _other_valid(node[path[-1]], data.draw(st.integers(0, 3), label="value"))
        target.write_text(json.dumps(doc))
    return True


def _hook_of(rel: str) -> str | None:
    return next((h for h in HOOKS if f"/{h}/" in f"/{rel}/" or rel.startswith(f"{h}/")), None)


def _judge(kind_of: str, run: Any, expect: str, names: list[str]) -> str:
    """'caught' (one-line UserError naming what it should) or 'identical'; fails otherwise."""
    try:
        got = run()
    except UserError as e:
        msg = str(e)
        assert "\n" not in msg, f"multi-line error: {msg!r}"
        for name in names:
            assert name in msg, f"{kind_of}: error does not name {name!r}: {msg}"
        return "caught"
    assert got == expect, f"{kind_of}: silently different results"
    return "identical"


def _count(family: str, outcome: str) -> None:
    COUNTS[family][outcome] = COUNTS[family].get(outcome, 0) + 1
    COUNTS[family]["tried"] = COUNTS[family].get("tried", 0) + 1


def _tampered_copy(
    pristine: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    data: st.DataObject,
    files: str,
    name: str,
    sibling: str,
) -> tuple[Path, str, str] | None:
    """A fresh copy of the pristine `name` (store or checkpoint folder) with one drawn file mutated
    by one drawn kind (`sibling`: the same-shaped other one, for swaps); (copy, file, kind), or None
    when the mutation does not apply to that file."""
    root: Path = pristine["root"]
    rel = data.draw(st.sampled_from(pristine[files]), label="file")
    kind = data.draw(st.sampled_from(KINDS), label="mutation")
    work = tmp_path_factory.mktemp(name.split(".")[0]) / name
    shutil.copytree(root / name, work)
    if not mutate(work / rel, kind, work, root / sibling / rel, data):
        return None
    return work, rel, kind


# -- the tests
# -----------------------------------------------------------------------------------------


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_tampered_store_files(
    pristine: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    drawn = _tampered_copy(pristine, tmp_path_factory, data, "store_files", "a.zarr", "b.zarr")
    if drawn is None:
        return
    work, rel, kind = drawn
    hook = _hook_of(rel)
    names = [str(work)] + ([hook] if hook else [])
    _count(
        "store",
        _judge(f"{kind} {rel}", lambda: store_result(str(work)), pristine["store_result"], names),
    )


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_tampered_checkpoint_files(
    pristine: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    drawn = _tampered_copy(pristine, tmp_path_factory, data, "ckpt_files", "ckpt_a", "ckpt_b")
    if drawn is None:
        return
    work, rel, kind = drawn
    _count(
        "checkpoint",
        _judge(
            f"{kind} {rel}",
            lambda: checkpoint_result(str(work)),
            pristine["ckpt_result"],
            [str(work)],
        ),
    )


@pytest.mark.parametrize(
    "drop",
    [
        (),
        ("store_id",),
        ("store_id", "integrity"),
        ("store_id", "integrity", "progress/side_crc"),
        ("store_id", "integrity", "progress/side_crc", "progress/chunk_crc"),
    ],
)
def test_format_edited_back_to_1(
    pristine: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, drop: tuple[str, ...]
) -> None:
    """The manifest's format edited from 2 to 1 (format 1 has fewer checks), alone or with format
    2's other traces removed from the manifest and the folder, and two shard files of a hook swapped
    (format 1 reads them without noticing; format 2 refuses them).  With every trace gone the store
    is a valid format-1 store (nothing inside it can tell): then the data is left as it was and the
    results must be identical."""
    root: Path = pristine["root"]
    work = tmp_path_factory.mktemp("f") / "a.zarr"
    shutil.copytree(root / "a.zarr", work)
    every_trace = "progress/chunk_crc" in drop
    if not every_trace:
        a, b = work / "acts/h.a/c/0/0", work / "acts/h.a/c/1/0"
        data_a, data_b = a.read_bytes(), b.read_bytes()
        a.write_bytes(data_b), b.write_bytes(data_a)
    doc = json.loads((work / "zarr.json").read_text())
    manifest = doc["attributes"]["manifest"]
    manifest["format"] = LEGACY_FORMAT
    for name in drop:
        if name in manifest:
            manifest.pop(name)
        else:
            shutil.rmtree(work / name)
    (work / "zarr.json").write_text(json.dumps(doc))
    outcome = _judge(
        f"format 1 without {drop}",
        lambda: store_result(str(work)),
        pristine["store_result"],
        [str(work)],
    )
    assert outcome == ("identical" if every_trace else "caught")
    _count("store", outcome)


def test_tamper_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """Print the counts (run after the two tests above, as pytest orders a module)."""
    s, c = COUNTS["store"], COUNTS["checkpoint"]
    tried = s.get("tried", 0) + c.get("tried", 0)
    caught = s.get("caught", 0) + c.get("caught", 0)
    with capsys.disabled():
        print(
            f"\nTAMPER tried={tried} caught={caught} identical={tried - caught} "
            f"(store {s.get('tried', 0)} tried / {s.get('caught', 0)} caught, "
            f"checkpoint {c.get('tried', 0)} tried / {c.get('caught', 0)} caught)"
        )
    if not tried:
        pytest.skip("counts come from the tamper tests of this module")
    assert caught > 0
