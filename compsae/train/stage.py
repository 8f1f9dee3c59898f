"""The train stage's entry in the pipeline (`compsae.registry`)."""

from __future__ import annotations

from compsae.harvest.records import HarvestOutputs
from compsae.lm.processing import check_harvest_processing
from compsae.registry import StageContext
from compsae.train.config import TrainStageConfig
from compsae.train.records import TrainOutputs
from compsae.train.run import run_train


def run(cfg: TrainStageConfig, ctx: StageContext) -> TrainOutputs:
    """Train every model on the harvest's store into the stage folder (every rank under torchrun;
    `workers` N, a CLI option: N models at once in their own processes)."""
    check_harvest_processing(ctx.inputs["harvest"])
    store = ctx.outputs("harvest", HarvestOutputs).store
    return TrainOutputs.model_validate(
        run_train(
            cfg,
            store,
            ctx.out_dir,
            force=ctx.force,
            workers=ctx.option("workers"),
            earlier=ctx.earlier,
            say=ctx.say,
        )
    )
