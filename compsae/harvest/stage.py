"""The harvest stage's entry in the pipeline (`compsae.registry`)."""

from __future__ import annotations

from compsae.harvest.config import HarvestConfig
from compsae.harvest.records import HarvestOutputs
from compsae.harvest.run import run_harvest
from compsae.registry import StageContext


def run(cfg: HarvestConfig, ctx: StageContext) -> HarvestOutputs:
    """Harvest into the stage folder (or `cfg.store`).  workers / scheduler change only speed (the
    store is byte-identical), so they are CLI options, not config fields in the stage hash."""
    return HarvestOutputs.model_validate(
        run_harvest(
            cfg,
            ctx.out_dir,
            force=ctx.force,
            workers=ctx.option("workers"),
            scheduler=ctx.option("scheduler"),
        )
    )
