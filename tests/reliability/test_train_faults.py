"""The train stage under faults: SIGKILL at random points, a full disk during a checkpoint write,
two trainings into one folder, and a pickle where a checkpoint should be."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import pickle
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from compsae import durable
from compsae.errors import UserError
from compsae.train.checkpoint import STATE_FILE, load_model, read_resume_meta
from compsae.train.config import TrainStageConfig
from compsae.train.run import run_train, training_lock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared store fixture
from train_fixtures import HOOK, make_store, model_cfg  # noqa: E402

pytestmark = pytest.mark.reliability

SMALL = {"n_latents": 64, "k": 4, "d_f": 16, "d_c": 8, "n_heads": 4, "aux_k": 16}
KILLS = 20
# a kill comes once the models' resumable steps (summed) are this many checkpoints (of 2 steps)
# past where the run started: 20 kills average ~380 of the 480 steps, across both models, and leave
# room for the few steps a run makes between the look that sees its target and the kill
MORE_CHECKPOINTS = range(3, 17)
GUARD_S = 600  # against a hang on a very loaded machine; no verdict here depends on speed


def _cfg(
    steps: int, checkpoint_every: int, models: tuple[str, ...] = ("comp", "topk"), **over: Any
) -> TrainStageConfig:
    types = {"comp": "compsae", "topk": "topk", "relu": "relu"}
    return TrainStageConfig(
        **{
            "hook": HOOK,
            "batch_size": 64,
            "tokens": 64 * steps,
            "log_every": 5,
            "checkpoint_every": checkpoint_every,
            "device": "cpu",
            "lr": 1e-3,
            "heldout_fraction": 0.1,
            "mix_chunks": 4,
            "num_threads": 1,
            "dead_window_tokens": 640,
            "models": {name: model_cfg(types[name], **SMALL) for name in models},
            **over,
        }
    )


def _weights_equal(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{a.name}.{key} differs"
    # the whole file too: weights and the config stored with them (step, tokens, finished)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def _metrics(folder: Path) -> list[dict[str, Any]]:
    rows = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def _progress(out_dir: Path, names: tuple[str, ...]) -> tuple[int, ...]:
    """The resumable step of every model (0 where none yet)."""
    steps = []
    for name in names:
        try:
            meta = read_resume_meta(str(out_dir / name))
        except (UserError, OSError, ValueError):
            meta = None
        steps.append(int(meta["step"]) if meta else 0)
    return tuple(steps)


def _train(cfg: TrainStageConfig, store_url: str, out_dir: str) -> None:
    """One training process: one torch thread (two threads that spin-wait on a shared, busy 2-core
    machine make each step 10x slower) and a thread lock for tqdm instead of a multiprocessing one,
    which a SIGKILL would leak."""
    import threading

    from tqdm.auto import tqdm

    torch.set_num_threads(1)
    tqdm.set_lock(threading.RLock())
    try:
        run_train(cfg, store_url, out_dir, progress=False)
    except BaseException:
        import traceback

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, "child-error.txt").write_text(
            traceback.format_exc()
        )  # for the assertion message
        raise


def _train_held_after_a_checkpoint(
    cfg: TrainStageConfig, store_url: str, out_dir: str, held: Any
) -> None:
    """`_train` that stops for good after its first checkpoint, once written, and sets `held`
    (a multiprocessing Event): it holds the training lock, alive, until it is killed."""
    import threading

    from compsae.train import trainer

    real = trainer.save_checkpoint

    def save_then_hold(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        held.set()
        threading.Event().wait()  # forever: the test kills this process

    trainer.save_checkpoint = save_then_hold
    _train(cfg, store_url, out_dir)


def _join(proc: Any, out_dir: Path, timeout: float = 300) -> None:
    """Wait for a training process and fail with its traceback when it failed."""
    proc.join(timeout)
    log = out_dir / "child-error.txt"
    assert proc.exitcode == 0, log.read_text() if log.exists() else f"exit code {proc.exitcode}"


def _forkserver() -> Any:
    # Children fork from a server that has already imported torch and compsae (and torch._dynamo,
    # which torch.optim imports on first use): a restart costs milliseconds instead of seconds,
    # so 20+ kills fit in the test's time.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["compsae.train.run", "compsae.variance", "torch._dynamo"])
    return ctx


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path):
    store, _ = make_store(str(tmp_path / "s.zarr"), n=2048)
    names = ("comp", "topk")
    steps = 240
    cfg = _cfg(steps, checkpoint_every=2, models=names)
    ctx = _forkserver()
    warm = ctx.Process(target=int)  # starts the fork server before the first training
    warm.start()
    warm.join()

    ref = ctx.Process(target=_train, args=(cfg, store.url, str(tmp_path / "ref")))
    ref.start()
    _join(ref, tmp_path / "ref")

    out = tmp_path / "killed"
    rng = random.Random(20240607)
    kills, seen, points = 0, (0, 0), []
    deadline = time.monotonic() + GUARD_S
    while kills < KILLS and time.monotonic() < deadline:
        proc = ctx.Process(target=_train, args=(cfg, store.url, str(out)))
        proc.start()
        # kill once the run has made a drawn number of checkpoints: counted, not timed, so the
        # kills spread over both models however fast or loaded the machine; the kill lands in
        # the steps, checkpoint writes and metrics appends that follow that checkpoint
        target = sum(seen) + 2 * rng.choice(MORE_CHECKPOINTS)
        while proc.is_alive() and sum(_progress(out, names)) < target:
            assert time.monotonic() < deadline, f"no progress to step {target} in {GUARD_S} s"
            time.sleep(0.005)  # how often progress is looked at, not how long the run goes on
        if not proc.is_alive():
            break  # finished before the kill: too few steps for the kills drawn
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        kills += 1
        seen = _progress(out, names)
        points.append(seen)
    print(f"training killed {kills} times with SIGKILL; resumable steps after each kill: {points}")
    assert kills >= KILLS, f"only {kills} kills before training finished; raise `steps`"
    # the guard is that most kills came while the models were still training, and some in each
    during = sum(p < (steps, steps) for p in points)
    assert any(p[0] < steps for p in points) and any(0 < p[1] < steps for p in points), points
    assert during >= KILLS // 2, f"only {during} kills came during training; raise `steps`"

    final = ctx.Process(target=_train, args=(cfg, store.url, str(out)))
    final.start()
    _join(final, out)
    for name in names:
        _weights_equal(tmp_path / "ref" / name, out / name)
        assert _metrics(out / name) == _metrics(tmp_path / "ref" / name)  # every logged step, once
        _, meta = load_model(str(out / name))
        assert meta["finished"] and meta["step"] == steps
        assert not list((out / name).glob("*.tmp"))


class _FullDisk:
    """A file that accepts `budget` bytes and then fails as a full disk does."""

    def __init__(self, inner: Any, budget: int) -> None:
        self.inner, self.budget = inner, budget

    def write(self, data: bytes) -> int:
        if len(data) > self.budget:
            self.inner.write(data[: self.budget])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.inner.close()


@pytest.mark.parametrize("victim", ["train_state.safetensors", "model.safetensors", "config.json"])
def test_disk_full_during_a_checkpoint_keeps_the_last_one_and_resumes(
    tmp_path, monkeypatch, victim
):
    store, _ = make_store(str(tmp_path / "s.zarr"), n=1024)
    cfg = _cfg(30, checkpoint_every=10, models=("topk",))
    run_train(cfg, store.url, str(tmp_path / "ref"), progress=False)

    writes = {"n": 0}
    real_write = durable.write_all

    def full_write(fd: int, data: Any) -> None:
        # every checkpoint file is written to "<name>.<id>.partial", then renamed (compsae.durable)
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith(f"{victim}.") and name.endswith(".partial"):
            writes["n"] += 1
            if writes["n"] == 2:  # the checkpoint of step 20
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(durable, "write_all", full_write)
    folder = tmp_path / "run" / "topk"
    with pytest.raises(UserError) as err:
        run_train(cfg, store.url, str(tmp_path / "run"), progress=False)
    message = str(err.value)
    assert (
        "disk full" in message
        and "step 20" in message
        and "rerun" in message
        and "\n" not in message
    )
    assert not list(folder.glob("*.tmp")) and not list(folder.glob("*.partial"))
    model, meta = load_model(str(folder))  # the folder still holds a loadable model
    assert meta["step"] in (10, 20) and not meta["finished"] and model.k == SMALL["k"]
    assert read_resume_meta(str(folder))["step"] == (10 if victim == STATE_FILE else 20)

    monkeypatch.setattr(durable, "write_all", real_write)  # space again
    out = run_train(cfg, store.url, str(tmp_path / "run"), progress=False)
    assert out["models"]["topk"]["finished"] and out["models"]["topk"]["step"] == 30
    _weights_equal(tmp_path / "ref" / "topk", folder)
    assert _metrics(folder) == _metrics(tmp_path / "ref" / "topk")


def test_second_training_into_the_same_folder_refuses(tmp_path):
    store, _ = make_store(str(tmp_path / "s.zarr"), n=1024)
    cfg = _cfg(150, checkpoint_every=5, models=("topk",))
    out = tmp_path / "run"
    # in one process: the lock is held while run_train tries
    with training_lock(str(out)), pytest.raises(UserError, match="another training is running"):
        run_train(cfg, store.url, str(out), progress=False)

    # across processes: a running training holds the lock; when it dies the lock dies with it.
    # The first training stops after its first checkpoint until killed, so it is alive and
    # part-way when the second one tries, however fast the machine runs either.
    ctx = _forkserver()
    held = ctx.Event()
    first = ctx.Process(
        target=_train_held_after_a_checkpoint, args=(cfg, store.url, str(out), held)
    )
    first.start()
    assert held.wait(GUARD_S), "the first training never wrote a checkpoint"
    assert first.is_alive()
    with pytest.raises(UserError, match="another training is running"):
        run_train(cfg, store.url, str(out), progress=False)
    os.kill(first.pid, signal.SIGKILL)
    first.join()
    assert 0 < _progress(out, ("topk",))[0] < 150
    result = run_train(
        cfg, store.url, str(out), progress=False
    )  # no stale lock: it resumes and finishes
    assert result["models"]["topk"]["finished"] and result["models"]["topk"]["step"] == 150


def test_pickle_where_a_checkpoint_should_be_is_refused_without_unpickling(tmp_path, monkeypatch):
    store, _ = make_store(str(tmp_path / "s.zarr"), n=1024)
    cfg = _cfg(6, checkpoint_every=3, models=("topk",))
    run_train(cfg, store.url, str(tmp_path / "run"), progress=False)
    folder = tmp_path / "run" / "topk"

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a checkpoint file was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)

    payload = pickle.dumps({"W_dec": np.zeros(3)})
    state = (folder / STATE_FILE).read_bytes()
    (folder / STATE_FILE).write_bytes(payload)  # the resume state
    with pytest.raises(UserError, match="not a valid safetensors"):
        run_train(cfg, store.url, str(tmp_path / "run"), force=False, progress=False)
    (folder / STATE_FILE).write_bytes(state)

    torch.save({"W_dec": torch.zeros(3)}, folder / "model.zip")  # torch's zip + pickle format
    (folder / "model.safetensors").write_bytes((folder / "model.zip").read_bytes())
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_model(str(folder))
    (folder / "model.safetensors").write_bytes(payload)
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_model(str(folder))
    (folder / "model.safetensors").unlink()
    (folder / "model.pt").write_bytes(payload)  # a pickle next to the config, under another name
    with pytest.raises(UserError, match="no model.safetensors"):
        load_model(str(folder))
