"""Kill suite for `--force` redos and for analyze: SIGKILL a forced harvest and a forced analyze at
random points of their run.  Whenever a stage's record (`stage.json`) exists afterwards, what it
records must be complete and valid (a store that is complete and verifies; analysis files that are
all there and parse) — never a record left over from before the redo.  A plain rerun then finishes.
Prints `KILL_REDO kills=<n> (harvest <n>, analyze <n>)`."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _compsae(args: list[str], work: Path, kill_after: float | None = None) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "compsae.cli", *args],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=kill_after if kill_after is not None else 900)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        return -9
    assert b"Traceback" not in err, err.decode()[-2000:]
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
        t0 = time.monotonic()
        assert _compsae([stage, *base, "--force"], tmp_path) == 0  # how long a redo takes here
        span = time.monotonic() - t0
        kills[stage] = 0
        for _ in range(n):
            if (
                _compsae(
                    [stage, *base, "--force"], tmp_path, kill_after=rng.uniform(0.1, 1.1) * span
                )
                == -9
            ):
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
