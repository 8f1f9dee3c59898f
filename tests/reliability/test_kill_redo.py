"""Kill suite for `--force` redos and for analyze: SIGKILL a forced harvest and a forced analyze at
random points of their run: after a drawn number of the files a redo writes in its stage folder
(counted, not timed, so the kills land inside the run on a loaded machine too).  Whenever a stage's
record (`stage.json`) exists afterwards, what it records must be complete and valid (a store that
is complete and verifies; analysis files that are all there and parse) — never a record left over
from before the redo.  A plain rerun then finishes.  Prints `KILL_REDO kills=<n> (harvest <n>,
analyze <n>)`."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from compsae.stages import resolve_record
from compsae.store import ActivationStore

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "harvest.n_tokens=2048",
    "train.tokens=2048",
    "train.models.compsae.n_latents=64",
    "train.models.topk.n_latents=64",
    "train.models.relu.n_latents=64",
    "analyze.baselines=[pca]",
    "analyze.max_heldout_tokens=512",
    "analyze.baseline_fit_tokens=256",
    "analyze.pair_latents=16",
]
KILLS = {"harvest": 5, "analyze": 5}
SEED = 14
GUARD_S = 900  # against a hang on a very loaded machine; no verdict here depends on speed


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """{path: (mtime_ns, size)} of every file under `folder` (files vanishing meanwhile skipped)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue  # renamed or removed while we looked
            out[os.path.join(root, name)] = (st.st_mtime_ns, st.st_size)
    return out


def _written_since(folder: Path, before: dict[str, tuple[int, int]]) -> int:
    """Files under `folder` that are new or changed since the snapshot `before`."""
    return sum(before.get(path) != stamp for path, stamp in _files(folder).items())


class KillAt(NamedTuple):
    """Kill the run once `writes` files under `folder` are new or changed since `before`."""

    folder: Path
    before: dict[str, tuple[int, int]]
    writes: int


def _compsae(args: list[str], work: Path, kill_at: KillAt | None = None) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    err_file = work / "child-stderr.txt"
    with open(err_file, "wb") as err_out:  # a file, not a pipe: nothing to drain while we watch
        proc = subprocess.Popen(
            [sys.executable, "-m", "compsae.cli", *args],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err_out,
            start_new_session=True,
        )
    deadline = time.monotonic() + GUARD_S
    killed = False
    while proc.poll() is None:
        if kill_at is not None and _written_since(kill_at.folder, kill_at.before) >= kill_at.writes:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = True
            break
        if time.monotonic() > deadline:
            proc.send_signal(signal.SIGKILL)
            raise AssertionError(f"compsae {args[0]} still running after {GUARD_S} s")
        time.sleep(0.005)  # how often the folder is looked at, not how long the run goes on
    err = err_file.read_text(errors="replace")
    if killed:
        return -9
    assert "Traceback" not in err, err[-2000:]
    return proc.returncode


def _stage(work: Path, stage: str) -> Path:
    found = sorted((work / "runs" / "tiny").glob(f"{stage}-*"))
    assert len(found) == 1, found
    return found[0]


def _record_is_true(folder: Path, stage: str) -> None:
    record_file = folder / "stage.json"
    if not record_file.exists():
        return  # not done: fine, the rerun redoes it
    # Read strictly (a torn record must fail here), then resolve its folder-relative paths.
    record = resolve_record(json.loads(record_file.read_text()), str(folder))
    if stage == "harvest":
        store = ActivationStore.open(record["outputs"]["store"])
        assert store.complete and store.verify() == [], "a harvest record over an incomplete store"
    else:
        json.loads((folder / "metrics.json").read_text())
        for rel in record["outputs"].get("files", {}).values():
            for name in (
                rel.values() if isinstance(rel, dict) else [rel] if isinstance(rel, str) else rel
            ):
                assert (folder / name).exists(), f"analyze record lists {name}, which is missing"


def test_killed_forced_redos_never_leave_a_record_that_lies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "--pipeline",
        "tiny",
        "--config",
        str(ROOT / "pipelines.yaml"),
        "--set",
        f"runs_root={tmp_path / 'runs'}",
    ]
    for s in SMALL:
        base += ["--set", s]
    rng = random.Random(SEED)
    assert _compsae(["run", *base], tmp_path) == 0
    kills = {}
    for stage, n in KILLS.items():
        folder = _stage(tmp_path, stage)
        before = _files(folder)
        assert _compsae([stage, *base, "--force"], tmp_path) == 0
        writes = _written_since(folder, before)  # the files a redo writes (or rewrites)
        assert writes > 1, writes
        kills[stage] = 0
        for _ in range(n):
            # 0: at once; writes - 1: before its last file
            kill_at = KillAt(folder, _files(folder), rng.randrange(writes))
            if _compsae([stage, *base, "--force"], tmp_path, kill_at) == -9:
                kills[stage] += 1
            _record_is_true(folder, stage)
        assert _compsae([stage, *base], tmp_path) == 0
        assert (folder / "stage.json").exists()
        _record_is_true(folder, stage)
    assert _compsae(["verify", str(tmp_path / "runs" / "tiny")], tmp_path) == 0
    with capsys.disabled():
        print(
            f"\nKILL_REDO kills={sum(kills.values())} (harvest {kills['harvest']}, analyze "
            f"{kills['analyze']})"
        )
    assert sum(kills.values()) >= 3
