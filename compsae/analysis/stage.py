"""The analyze stage's entry in the pipeline (`compsae.registry`)."""

from __future__ import annotations

from compsae.analysis.config import AnalyzeConfig
from compsae.analysis.records import AnalyzeOutputs
from compsae.analysis.run import run_analyze
from compsae.harvest.records import HarvestOutputs
from compsae.lm.processing import check_harvest_processing
from compsae.registry import StageContext


def run(cfg: AnalyzeConfig, ctx: StageContext) -> AnalyzeOutputs:
    """Analyse every model of the train stage on the harvest's store.  workers / scheduler (CLI
    options) override the config's: they change speed, not numbers; trust_unverified (CLI)
    admits checkpoints without a content digest."""
    check_harvest_processing(ctx.inputs["harvest"])
    speed = {k: ctx.option(k) for k in ("workers", "scheduler") if ctx.option(k) is not None}
    return AnalyzeOutputs.model_validate(
        run_analyze(
            cfg,
            store_url=ctx.outputs("harvest", HarvestOutputs).store,
            train_dir=ctx.folder("train"),
            out_dir=ctx.out_dir,
            trust_unverified=bool(ctx.option("trust_unverified")),
            **speed,
        )
    )
