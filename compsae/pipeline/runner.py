"""Run the stages of a pipeline in order, reusing every stage whose inputs and config are
unchanged."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from compsae.errors import UserError
from compsae.pipeline.config import PipelineConfig, PipelinesFile
from compsae.registry import STAGE_INPUTS, STAGE_ORDER, STAGES, StageContext
from compsae.stages import (
    StageStatus,
    config_changes,
    config_for_hash,
    describe_changes,
    done_folders,
    invalidate_record,
    join,
    make_record,
    read_record,
    relative_record,
    resolve_record,
    semantic_part,
    stage_dir,
    stage_hash,
    stage_lock,
    write_record,
)


def stage_config(pipe: PipelineConfig, stage: str) -> Any:
    """The config of `stage` in `pipe`, or None when the pipeline does not run it."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; stages are {', '.join(STAGE_ORDER)}")
    return STAGES[stage].config(pipe)


def plan(whole: PipelinesFile, pipe: PipelineConfig, name: str) -> list[StageStatus]:
    """Where each stage of pipeline `name` stands: done, stale, missing, or waiting on an input."""
    statuses: dict[str, StageStatus] = {}
    for stage in STAGE_ORDER:
        cfg = stage_config(pipe, stage)
        if cfg is None:
            continue
        inputs = {}
        waiting = [s for s in STAGE_INPUTS[stage] if s in statuses and statuses[s].state != "done"]
        if waiting:
            statuses[stage] = StageStatus(
                stage, "waiting", None, None, note=f"needs {', '.join(waiting)} first"
            )
            continue
        for s in STAGE_INPUTS[stage]:
            if s in statuses:
                inputs[s] = {**statuses[s].record, "path": statuses[s].path}  # type: ignore[dict-item]
        digest = stage_hash(stage, cfg, inputs)
        folder = stage_dir(whole.runs_root, name, stage, digest)
        record = read_record(folder)
        if record is not None:
            statuses[stage] = StageStatus(stage, "done", folder, digest, record)
            continue
        others = [
            f
            for f in done_folders(whole.runs_root, name, stage)
            if not f.rstrip("/").endswith(digest)
        ]
        state = "stale" if others else "missing"
        note = f"last done: {others[0]}" if others else ""
        statuses[stage] = StageStatus(stage, state, folder, digest, None, note)
    return list(statuses.values())


def run_stage(
    stage: str,
    whole: PipelinesFile,
    pipe: PipelineConfig,
    name: str,
    force: bool = False,
    options: dict[str, Any] | None = None,
    say: Any = print,
) -> StageStatus:
    """Run one stage if its folder has no completion record (or `force`); return its status."""
    cfg = stage_config(pipe, stage)
    if cfg is None:
        raise UserError(
            f"pipeline {name!r} has no {stage} stage; add a '{stage}:' section to it in "
            "pipelines.yaml"
        )
    by_stage = {s.stage: s for s in plan(whole, pipe, name)}
    status = by_stage[stage]
    if status.state == "waiting":
        missing = [
            s for s in STAGE_INPUTS[stage] if by_stage.get(s) and by_stage[s].state != "done"
        ]
        raise UserError(
            f"{stage} of pipeline {name!r} needs {', '.join(missing)} first: run `compsae "
            f"{missing[0]} --pipeline {name}` "
            f"or `compsae run --pipeline {name}`"
        )
    if status.state == "done" and not force:
        say(f"{stage}: up to date, nothing to do ({status.path})")
        return status
    inputs = {
        s: {**by_stage[s].record, "path": by_stage[s].path}
        for s in STAGE_INPUTS[stage]
        if s in by_stage
    }
    assert status.path is not None and status.hash is not None
    earlier = earlier_folders(whole, name, stage, status.path)
    from compsae.train.distributed import is_rank0, launched_world_size

    spec = STAGES[stage]
    if launched_world_size() > 1 and not spec.distributed:
        runs = ", ".join(f"`compsae {s.name}`" for s in STAGES.values() if s.distributed)
        raise UserError(f"only {runs} runs under torchrun; run `compsae {stage}` as one process")
    main = (
        is_rank0()
    )  # under torchrun every rank runs the stage; rank 0 alone locks, records and talks
    if main:
        say(f"{stage}: running into {status.path}")
        why = rerun_reason(stage, pipe, cfg, inputs, earlier, force and status.state == "done")
        if why:
            say(f"{stage}: rerun because {why}")
    # a distributed stage takes its folder's lock itself, so that every rank gets the verdict
    with stage_lock(status.path, stage) if main and not spec.distributed else nullcontext():
        if main:
            invalidate_record(status.path)  # a redo killed half-way must not look done
        outputs = _call_stage(
            stage, cfg, status.path, inputs, force, options or {}, earlier=earlier, say=say
        )
        record = make_record(stage, status.hash, cfg, inputs, outputs, folder=status.path)
        # written relative to its folder, handed on as any reader would see it
        written = relative_record(record, status.path, whole.runs_root)
        if main:
            write_record(status.path, written)
        record = resolve_record(written, status.path)
    if main:
        from compsae.pipeline.report import write_pipeline_report

        report = write_pipeline_report(whole, pipe, name, plan(whole, pipe, name))
        say(f"{stage}: done ({status.path}); pipeline report: {report}")
    return StageStatus(stage, "done", status.path, status.hash, record)


def earlier_folders(whole: PipelinesFile, name: str, stage: str, folder: str) -> tuple[str, ...]:
    """The done folders of `stage` in pipeline `name` other than `folder`, newest first, each as
    `stage_dir` names it (under the runs root as configured)."""
    here = folder.rstrip("/").rsplit("/", 1)[-1]
    names = [f.rstrip("/").rsplit("/", 1)[-1] for f in done_folders(whole.runs_root, name, stage)]
    return tuple(join(whole.runs_root, name, n) for n in names if n != here)


def _section(stage: str, pipe: PipelineConfig) -> str:
    """The key of `stage`'s config in a pipeline (what `--set` paths start with)."""
    return "ground_truth" if stage == "harvest" and pipe.harvest is None else stage


def rerun_reason(
    stage: str,
    pipe: PipelineConfig,
    cfg: Any,
    inputs: dict[str, dict[str, Any]],
    earlier: tuple[str, ...],
    forced: bool = False,
) -> str:
    """Why `stage` runs into a new folder, in a few words: the config field that changed since its
    newest done run (`train.models.topk.k changed (4 -> 8)`), or the upstream stage that changed;
    "" for a stage that never ran."""
    if forced:
        return "--force asks to redo it"
    last = read_record(earlier[0]) if earlier else None
    if last is None:
        return ""
    reasons = []
    changed = describe_changes(
        config_changes(
            semantic_part(last.get("config") or {}), config_for_hash(cfg), _section(stage, pipe)
        )
    )
    if changed:
        reasons.append(changed)
    before = last.get("inputs") or {}
    for s, rec in sorted(inputs.items()):
        if (before.get(s) or {}).get("hash") != rec.get("hash"):
            reasons.append(f"upstream stage {s} changed (now {rec.get('path')})")
    return "; ".join(reasons) or f"its inputs changed since {earlier[0]}"


def _call_stage(
    stage: str,
    cfg: Any,
    out_dir: str,
    inputs: dict[str, dict[str, Any]],
    force: bool,
    options: dict[str, Any],
    earlier: tuple[str, ...] = (),
    say: Any = print,
) -> Any:
    """Run `stage` through its registered runner; returns its outputs record."""
    ctx = StageContext(out_dir, inputs, force, options, earlier=earlier, say=say)
    return STAGES[stage].runner(cfg)(cfg, ctx)


def run_pipeline(
    whole: PipelinesFile,
    pipe: PipelineConfig,
    name: str,
    force: bool = False,
    options: dict[str, Any] | None = None,
    say: Any = print,
) -> list[StageStatus]:
    """Run every stage of the pipeline in order; `force` redoes them all; end with a summary."""
    done = []
    for stage in STAGE_ORDER:
        if stage_config(pipe, stage) is not None:
            done.append(run_stage(stage, whole, pipe, name, force=force, options=options, say=say))
    from compsae.train.distributed import is_rank0

    if is_rank0():
        for line in run_summary(whole, name, done):
            say(line)
    return done


def _fmt(value: Any, digits: int) -> str:
    """`value` to `digits` decimals, or "-" where the metric is absent (no composition path)."""
    return "-" if value is None else f"{float(value):.{digits}f}"


def run_summary(whole: PipelinesFile, name: str, statuses: list[StageStatus]) -> list[str]:
    """The lines `compsae run` ends with: the pipeline report's path and, per model, the headline
    held-out FVU, L0 and composition share from the analyze stage's metrics.json.  The headline is
    the BOS-free block (`rest`) where analyze wrote one: the sequence-start token's huge norm would
    otherwise dominate the FVU."""
    import json

    import fsspec

    from compsae.files import ANALYSIS_METRICS, PIPELINE_REPORT

    lines = [f"summary: pipeline report {join(whole.runs_root, name, PIPELINE_REPORT)}"]
    analyze = next((s for s in statuses if s.stage == "analyze" and s.state == "done"), None)
    if analyze is None or analyze.path is None:
        return lines
    url = join(analyze.path, ANALYSIS_METRICS)
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return lines
    with fs.open(path, "r") as f:
        models = json.load(f).get("models") or {}
    rows = []
    for model, blocks in models.items():
        block = blocks.get("rest") or blocks.get("all") or {}
        which = "rest" if blocks.get("rest") else "all"
        rows.append(
            (
                model,
                _fmt(block.get("fvu"), 3),
                _fmt(block.get("l0"), 1),
                _fmt(block.get("comp_share"), 3),
                which,
            )
        )
    if not rows:
        return lines
    width = max(len(r[0]) for r in rows)
    lines.append(
        f"  {'model':<{width}}  {'held-out FVU':>12}  {'L0':>6}  {'comp. share':>11}  "
        "tokens (rest = BOS-free)"
    )
    for model, fvu, l0, share, which in rows:
        lines.append(f"  {model:<{width}}  {fvu:>12}  {l0:>6}  {share:>11}  {which}")
    return lines
