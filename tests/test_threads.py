"""Torch thread counts are scoped: models and tasks give the process its count back."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import compsae
from compsae.analysis import block_stats
from compsae.threads import torch_threads
from compsae.train import run as train_run
from compsae.train.models.composer import largest_along_keys

OTHER = 3  # a count no scope below asks for, so a missed restore shows


@pytest.fixture
def process_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(OTHER)
    yield OTHER
    torch.set_num_threads(before)


def test_scope_restores_on_exit_on_error_and_when_nested(process_threads):
    with torch_threads(1):
        assert torch.get_num_threads() == 1
        with torch_threads(2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == process_threads
    with pytest.raises(RuntimeError, match="boom"), torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == process_threads
    with pytest.raises(ValueError, match="n >= 1"), torch_threads(0):
        pass


def test_scopes_open_in_several_threads_restore_once_all_close(process_threads):
    inside: list[int] = []
    opened = threading.Barrier(4)

    def task() -> None:
        with torch_threads(1):
            opened.wait()  # all four scopes open at once; each closes while others are open
            inside.append(torch.get_num_threads())

    workers = [threading.Thread(target=task) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert inside == [1, 1, 1, 1]
    assert torch.get_num_threads() == process_threads


def test_composer_top_keys_leave_the_process_count(process_threads):
    largest_along_keys(torch.randn(2, 9, 4), 3)
    assert torch.get_num_threads() == process_threads


def test_block_partial_runs_on_one_thread_and_gives_it_back(process_threads, monkeypatch):
    seen: list[int] = []

    def spy(r, x, pos, rows, spec):
        seen.append(torch.get_num_threads())
        return {}

    monkeypatch.setattr(block_stats, "model_partial", spy)
    recon = SimpleNamespace(name="m")
    keep = np.array([True, False, True])
    out = block_stats.block_partial(np.zeros((3, 2)), keep, np.arange(3), 0, [recon], None)
    assert out == {"m": {}} and seen == [1]
    assert torch.get_num_threads() == process_threads


def test_train_worker_sets_the_model_count_for_that_model_only(process_threads, monkeypatch):
    seen: list[int] = []
    cfg = SimpleNamespace(hook="h", model_for=lambda n: None, train_for=lambda n: None)
    monkeypatch.setattr(
        train_run, "TrainStageConfig", SimpleNamespace(model_validate=lambda j: cfg)
    )
    monkeypatch.setattr(train_run, "open_training_store", lambda url, hook: None)
    monkeypatch.setattr(
        train_run, "train_one", lambda *a, **k: seen.append(torch.get_num_threads())
    )
    train_run._train_worker({}, "m", "url", "hash", 4, "folder", False, threads=1)
    assert seen == [1]
    assert torch.get_num_threads() == process_threads


def test_no_process_wide_thread_count_outside_the_scope():
    root = Path(compsae.__file__).parent
    calls = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if re.search(r"\bset_num_threads\(", p.read_text(encoding="utf-8"))
        and p.name != "threads.py"
    ]
    assert calls == []
