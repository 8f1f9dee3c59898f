"""Run the stages of a pipeline in order, reusing every stage whose inputs and config are unchanged."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from compsae.config import PipelineConfig, PipelinesFile
from compsae.errors import UserError
from compsae.files import STORE_DIR
from compsae.stages import (
    STAGE_INPUTS,
    STAGE_ORDER,
    StageStatus,
    done_folders,
    invalidate_record,
    make_record,
    read_record,
    stage_dir,
    stage_hash,
    stage_lock,
    write_record,
)


def stage_config(pipe: PipelineConfig, stage: str) -> Any:
    """The config of `stage` in `pipe`, or None when the pipeline does not run it.

    The first stage is called harvest whether it runs a model or writes ground-truth data."""
    if stage == "harvest":
        return pipe.source
    return getattr(pipe, stage, None)


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
            statuses[stage] = StageStatus(stage, "waiting", None, None, note=f"needs {', '.join(waiting)} first")
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
        others = [f for f in done_folders(whole.runs_root, name, stage) if not f.rstrip("/").endswith(digest)]
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
        raise UserError(f"pipeline {name!r} has no {stage} stage; add a '{stage}:' section to it in pipelines.yaml")
    by_stage = {s.stage: s for s in plan(whole, pipe, name)}
    status = by_stage[stage]
    if status.state == "waiting":
        missing = [s for s in STAGE_INPUTS[stage] if by_stage.get(s) and by_stage[s].state != "done"]
        raise UserError(
            f"{stage} of pipeline {name!r} needs {', '.join(missing)} first: run `compsae {missing[0]} --pipeline {name}` "
            f"or `compsae run --pipeline {name}`"
        )
    if status.state == "done" and not force:
        say(f"{stage}: up to date, nothing to do ({status.path})")
        return status
    inputs = {s: {**by_stage[s].record, "path": by_stage[s].path} for s in STAGE_INPUTS[stage] if s in by_stage}
    assert status.path is not None and status.hash is not None
    from compsae.train.distributed import is_rank0, launched_world_size

    if launched_world_size() > 1 and stage != "train":
        raise UserError(f"only `compsae train` runs under torchrun; run `compsae {stage}` as one process")
    main = is_rank0()  # under torchrun every rank trains; rank 0 alone locks, records and talks
    if main:
        say(f"{stage}: running into {status.path}")
    with stage_lock(status.path, stage) if main else nullcontext():
        if main:
            invalidate_record(status.path)  # a redo killed half-way must not look done
        outputs = _call_stage(stage, cfg, status.path, inputs, force, options or {})
        record = make_record(stage, status.hash, cfg, inputs, outputs)
        if main:
            write_record(status.path, record)
    if main:
        from compsae.pipeline_report import write_pipeline_report

        report = write_pipeline_report(whole, pipe, name, plan(whole, pipe, name))
        say(f"{stage}: done ({status.path}); pipeline report: {report}")
    return StageStatus(stage, "done", status.path, status.hash, record)


def _call_stage(stage: str, cfg: Any, out_dir: str, inputs: dict[str, dict[str, Any]], force: bool,
                options: dict[str, Any]) -> dict[str, Any]:
    # Imported here: each stage pulls in torch / transformer_lens / dask, which the CLI's
    # `status` and error paths should not pay for.
    if stage == "harvest":
        from compsae.evaluation.config import GroundTruthConfig

        if isinstance(cfg, GroundTruthConfig):
            return _write_ground_truth(cfg, out_dir, force)
        from compsae.harvest.run import run_harvest

        # workers / scheduler change only speed (the store is byte-identical), so they are CLI
        # options, not config fields that would change the stage hash
        return run_harvest(cfg, out_dir, force=force, workers=options.get("workers"),
                           scheduler=options.get("scheduler"))
    from compsae.harvest.records import HarvestOutputs

    data = HarvestOutputs.model_validate(inputs["harvest"]["outputs"])
    if stage == "train":
        from compsae.train.run import run_train

        return run_train(cfg, data.store, out_dir, force=force, workers=options.get("workers"))
    if stage == "analyze":
        from compsae.analysis.run import run_analyze

        return run_analyze(
            cfg,
            store_url=data.store,
            train_dir=inputs["train"]["path"],
            out_dir=out_dir,
            force=force,
            **{k: v for k, v in options.items() if k in ("workers", "scheduler") and v is not None},
        )
    if stage == "evaluate":
        from compsae.evaluation.config import EvalRun
        from compsae.evaluation.stage import run_evaluate
        from compsae.train.records import TrainOutputs

        train_out = TrainOutputs.model_validate(inputs["train"]["outputs"])
        runs = cfg.runs or [EvalRun(label=name, checkpoint=rec.path, store=train_out.store)
                            for name, rec in train_out.models.items()]
        return run_evaluate(cfg.model_copy(update={"runs": runs}), out_dir)
    if stage == "probe":
        from compsae.evaluation.probe_stage import run_probe

        return run_probe(cfg, data.store, inputs["train"]["path"], out_dir,
                         progress=print)
    raise UserError(f"unknown stage {stage!r}; stages are {', '.join(STAGE_ORDER)}")


def _write_ground_truth(cfg: Any, out_dir: str, force: bool) -> dict[str, Any]:
    from compsae.evaluation.ground_truth import write_ground_truth_store
    from compsae.harvest.records import HarvestOutputs
    from compsae.stages import join
    from compsae.store import ActivationStore, manifest_digest

    url = join(out_dir, STORE_DIR)
    summary = write_ground_truth_store(cfg, url, overwrite=force)
    store = ActivationStore.open(url)
    return HarvestOutputs.model_validate({**summary, "store": url, "hooks": {cfg.hook: cfg.d_model},
                                         "digest": manifest_digest(store.manifest)}).model_dump(mode="json")


def run_pipeline(whole: PipelinesFile, pipe: PipelineConfig, name: str, force: bool = False,
                 options: dict[str, Any] | None = None, say: Any = print) -> list[StageStatus]:
    """Run every stage of the pipeline in order; `force` redoes them all."""
    done = []
    for stage in STAGE_ORDER:
        if stage_config(pipe, stage) is not None:
            done.append(run_stage(stage, whole, pipe, name, force=force, options=options, say=say))
    return done
