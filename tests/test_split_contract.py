"""The held-out split is one contract across stages: a model trained with a non-zero seed is
analysed, evaluated, probed and exported for human evaluation on exactly the sequences its training
held out, never on its own training rows.

Every stage draws its split through `compsae.store.split.heldout_mask`; the test records each call
(its arguments and the mask it returned) stage by stage and compares them with training's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import compsae.store.split
from compsae.pipeline.config import PipelinesFile
from compsae.pipeline.runner import run_stage
from compsae.store import ActivationStore

TRAIN_SEED = 3  # any seed but 0, the split's own default
FRACTION = 0.25
TRAIN = {
    "tokens": 1024,
    "batch_size": 128,
    "lr": 1e-3,
    "log_every": 4,
    "checkpoint_every": 8,
    "device": "cpu",
    "seed": TRAIN_SEED,
    "heldout_fraction": FRACTION,
    "mix_chunks": 2,
    "num_threads": 1,
}
MODELS = {
    "topk": {"type": "topk", "n_latents": 32, "k": 4},
    "compsae": {"type": "compsae", "n_latents": 32, "k": 4, "d_f": 8, "d_c": 8, "n_heads": 2},
}


class SplitSpy:
    """Records every held-out mask drawn while a stage runs: (fraction, seed, mask)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int, np.ndarray]] = []
        self._real = compsae.store.split.heldout_mask

    def __call__(self, seq_id: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
        mask = self._real(seq_id, fraction, seed)
        self.calls.append((float(fraction), int(seed), mask.copy()))
        return mask

    def take(self) -> list[tuple[float, int, np.ndarray]]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[SplitSpy]:
    s = SplitSpy()
    monkeypatch.setattr(
        compsae.store.split, "heldout_mask", s
    )  # the loader draws through split too
    yield s


def _pipelines(root: Path, pipeline: dict) -> tuple[PipelinesFile, str]:
    whole = PipelinesFile.model_validate(
        {"runs_root": str(root / "runs"), "pipelines": {"p": pipeline}}
    )
    return whole, "p"


def _run(stage: str, whole: PipelinesFile, name: str):
    return run_stage(stage, whole, whole.pipelines[name], name, say=lambda *_: None)


def _whole_masks(
    calls: list[tuple[float, int, np.ndarray]], n_rows: int
) -> list[tuple[float, int, np.ndarray]]:
    """The calls as masks over the whole store: the training loader draws its split shard by shard
    (consecutive calls, same arguments), the other stages over the whole column at once."""
    out: list[tuple[float, int, np.ndarray]] = []
    parts: list[np.ndarray] = []
    for fraction, seed, mask in calls:
        if parts:
            assert (fraction, seed) == out[-1][:2], "a split drawn in parts changed its arguments"
        else:
            out.append((fraction, seed, mask))
        parts.append(mask)
        if sum(len(p) for p in parts) == n_rows:
            out[-1] = (fraction, seed, np.concatenate(parts))
            parts = []
    assert not parts, "a split drawn in parts did not cover the store"
    return out


def _training_split(spy: SplitSpy, n_rows: int) -> np.ndarray:
    """The held-out mask training used (every training call must agree), and it must hold some
    rows out and keep some in: otherwise the comparison below proves nothing."""
    calls = _whole_masks(spy.take(), n_rows)
    assert calls, "training drew no split"
    held = calls[0][2]
    for _, _, mask in calls:
        np.testing.assert_array_equal(mask, held)
    assert held.shape == (n_rows,) and 0 < held.sum() < n_rows
    return held


def _assert_same_split(spy: SplitSpy, held: np.ndarray, stage: str) -> None:
    calls = _whole_masks(spy.take(), len(held))
    assert calls, f"{stage} drew no split"
    for fraction, seed, mask in calls:
        assert np.array_equal(mask, held), (
            f"{stage} used split (fraction {fraction}, seed {seed}): {int((mask & ~held).sum())} "
            "of its held-out "
            f"rows are training rows"
        )


def test_analyze_probe_and_humaneval_use_the_rows_training_held_out(
    tmp_path: Path, spy: SplitSpy
) -> None:
    whole, name = _pipelines(
        tmp_path,
        {
            "harvest": {
                "model": "tiny-neox",
                "hooks": ["blocks.1.hook_resid_post"],
                "context": 32,
                "n_tokens": 2048,
                "batch_size": 16,
                "chunk_rows": 256,
                "shard_rows": 1024,
                "device": "cpu",
                "data": {"source": "synthetic:mixed", "seed": 0},
            },
            "train": {"hook": "blocks.1.hook_resid_post", **TRAIN, "models": MODELS},
            "analyze": {
                "ce": False,
                "baselines": ["pca"],
                "baseline_fit_tokens": 256,
                "pair_latents": 16,
                "max_heldout_tokens": 100_000,
                "top_k_contexts": 2,
                "plots": False,
                "progress": False,
            },
            "probe": {
                "n_items": 20,
                "families": ["boolean"],
                "ks": [1],
                "pca_components": 4,
                "nmf_components": 4,
                "fit_rows": 256,
                "batch_size": 20,
                "device": "cpu",
                "answer_probes": "never",
            },
        },
    )
    harvest = _run("harvest", whole, name)
    store = ActivationStore.open(harvest.record["outputs"]["store"])
    spy.take()
    train = _run("train", whole, name)
    held = _training_split(spy, store.n_rows)

    analyze = _run("analyze", whole, name)
    _assert_same_split(spy, held, "analyze")
    metrics = json.loads((Path(analyze.path) / "metrics.json").read_text())
    assert metrics["n_tokens"] == int(held.sum())  # every held-out row, and only those, was scored

    _run("probe", whole, name)
    _assert_same_split(spy, held, "probe")

    from compsae.evaluation.human_study.kit import export_from_checkpoints

    checkpoints = {m: rec["path"] for m, rec in train.record["outputs"]["models"].items()}
    export_from_checkpoints(
        checkpoints, str(store.url), str(tmp_path / "humaneval"), n=2, n_rows=10_000, n_raters=1
    )
    _assert_same_split(spy, held, "humaneval export")


def test_evaluate_uses_the_rows_training_held_out(tmp_path: Path, spy: SplitSpy) -> None:
    whole, name = _pipelines(
        tmp_path,
        {
            "ground_truth": {
                "d_model": 16,
                "n_features": 32,
                "n_rows": 4096,
                "n_interactions": {2: 4},
                "context": 32,
                "seed": 0,
            },
            "train": {"hook": "synthetic.hook_x", **TRAIN, "models": MODELS},
            "evaluate": {"max_rows": 100_000, "batch_size": 512},
        },
    )
    harvest = _run("harvest", whole, name)
    store = ActivationStore.open(harvest.record["outputs"]["store"])
    spy.take()
    _run("train", whole, name)
    held = _training_split(spy, store.n_rows)

    evaluate = _run("evaluate", whole, name)
    _assert_same_split(spy, held, "evaluate")
    for row in evaluate.record["outputs"]["rows"]:
        assert row["n_eval_rows"] == int(held.sum())


def test_checkpoints_without_a_split_record_map_to_what_training_did() -> None:
    from compsae.store.split import HeldOutSplit, shared_split
    from compsae.train.records import CheckpointMeta

    base = {"type": "topk", "model": {"type": "topk", "n_latents": 8, "k": 2}, "d_in": 4}
    # written before the split was recorded: training held out train.heldout_fraction with seed 0,
    # whatever its own seed was
    old = CheckpointMeta.model_validate({**base, "train": {"heldout_fraction": 0.2, "seed": 7}})
    assert old.split == HeldOutSplit(fraction=0.2, seed=0)
    new = CheckpointMeta.model_validate({**base, "split": {"fraction": 0.1, "seed": 5}})
    assert new.split == HeldOutSplit(fraction=0.1, seed=5)
    imported = CheckpointMeta.model_validate(base)  # trained elsewhere: no split
    assert imported.split is None
    # models are evaluated on one split; an imported one fits any, another split is named
    split, other = shared_split({"imported": None, "a": old.split, "b": new.split, "c": old.split})
    assert split == old.split and other == ["b"]
    assert shared_split({"imported": None}) == (HeldOutSplit(), [])
