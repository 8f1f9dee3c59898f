"""A harvest killed with SIGKILL mid-run resumes into a store identical to an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from compsae.harvest.config import HarvestConfig
from compsae.harvest.run import run_harvest
from compsae.store import ActivationStore

CFG = dict(model="tiny-neox", hooks=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], context=64,
           n_tokens=50_000, batch_size=8, chunk_rows=512, shard_rows=1024, data={"source": "synthetic:mixed"})


def _done_shards(url: str) -> int:
    try:
        return int((zarr.open_array(f"{url}/progress/shard_done", mode="r")[:] == 1).sum())
    except Exception:  # noqa: BLE001 - the store may not exist yet
        return 0


@pytest.mark.reliability
def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = HarvestConfig(**CFG)
    killed_dir, url = tmp_path / "killed", str(tmp_path / "killed" / "store.zarr")
    code = ("import sys; from compsae.harvest.config import HarvestConfig; from compsae.harvest.run import run_harvest; "
            "run_harvest(HarvestConfig.model_validate_json(sys.argv[1]), sys.argv[2])")
    proc = subprocess.Popen([sys.executable, "-c", code, cfg.model_dump_json(), str(killed_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _done_shards(url) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the harvest finished before it could be killed"
    partial = ActivationStore.open(url)
    assert not partial.complete and 3 <= len(partial.done_shards()) < partial.n_shards

    resumed = run_harvest(cfg, str(killed_dir))
    whole = run_harvest(cfg, str(tmp_path / "whole"))
    a, b = ActivationStore.open(resumed["store"]), ActivationStore.open(whole["store"])
    assert a.verify() == [] and a.complete
    for hook in cfg.hooks:
        np.testing.assert_array_equal(a.zarr_array(hook)[:], b.zarr_array(hook)[:])
    for col in ("tokens", "seq_id", "pos"):
        np.testing.assert_array_equal(getattr(a, col), getattr(b, col))
    assert resumed["digest"] == whole["digest"]
