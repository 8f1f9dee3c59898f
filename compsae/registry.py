"""The stages of a pipeline, in order: what each reads and the function that runs it.

Every stage exports `run(cfg, ctx: StageContext) -> <its outputs record>`; the pipeline is a loop
over `STAGES` and knows nothing stage-specific.  Runners are named, not imported, so the CLI's
`status` and error paths do not pay for torch / transformer_lens / dask.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

T = TypeVar("T", bound=BaseModel)


@dataclass(frozen=True)
class StageContext:
    """What a stage run gets besides its config: its folder, the records of the stages it reads
    (each with its folder as "path"), `force`, the CLI options that are not config (workers,
    scheduler: speed only; trust_unverified: load checkpoints without a content digest), the done
    folders of earlier runs of the stage under other configs (newest first: the train stage takes
    unchanged models from them) and where its one-line messages go."""

    out_dir: str
    inputs: dict[str, dict[str, Any]]
    force: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    earlier: tuple[str, ...] = ()
    say: Callable[[str], Any] = print

    def outputs(self, stage: str, record: type[T]) -> T:
        """The outputs of input `stage`, read through its record model."""
        return record.model_validate(self.inputs[stage]["outputs"])

    def folder(self, stage: str) -> str:
        """The folder of input `stage`."""
        return str(self.inputs[stage]["path"])

    def option(self, name: str) -> Any:
        return self.options.get(name)


@dataclass(frozen=True)
class StageSpec:
    """One stage: its name (the folder prefix), the stages it reads, the runner per config type
    ("module:function"), the attribute of `PipelineConfig` holding its config (default: its name),
    and whether it runs under torchrun (every rank) and so takes its folder's lock itself (rank 0
    takes it, every rank gets the verdict)."""

    name: str
    inputs: tuple[str, ...]
    runners: dict[str, str]
    distributed: bool = False
    section: str = ""

    def config(self, pipe: Any) -> BaseModel | None:
        """This stage's config in pipeline `pipe`, or None when the pipeline does not run it."""
        return getattr(pipe, self.section or self.name, None)

    def runner(self, cfg: BaseModel) -> Callable[[Any, StageContext], Any]:
        """The run function for `cfg` (the data stage runs a harvest or writes ground truth)."""
        target = self.runners[type(cfg).__name__]
        module, _, func = target.partition(":")
        return getattr(importlib.import_module(module), func)


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        # the data stage is called harvest whether it runs a model or writes ground-truth data
        StageSpec(
            "harvest",
            (),
            {
                "HarvestConfig": "compsae.harvest.stage:run",
                "GroundTruthConfig": "compsae.evaluation.ground_truth.stage:run",
            },
            section="source",
        ),
        StageSpec(
            "train", ("harvest",), {"TrainStageConfig": "compsae.train.stage:run"}, distributed=True
        ),
        StageSpec("analyze", ("harvest", "train"), {"AnalyzeConfig": "compsae.analysis.stage:run"}),
        StageSpec(
            "evaluate",
            ("harvest", "train"),
            {"EvaluateConfig": "compsae.evaluation.comparison.stage:run"},
        ),
        StageSpec(
            "probe", ("harvest", "train"), {"ProbeConfig": "compsae.evaluation.probes.stage:run"}
        ),
    )
}
STAGE_ORDER = tuple(STAGES)
STAGE_INPUTS: dict[str, tuple[str, ...]] = {name: s.inputs for name, s in STAGES.items()}
