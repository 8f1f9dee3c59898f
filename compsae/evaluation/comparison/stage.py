"""The ``evaluate`` stage (`compsae.registry`): score checkpoints on ground-truth stores, write the
table."""

from __future__ import annotations

import json

import fsspec

from compsae.errors import UserError
from compsae.evaluation.comparison.config import EvalRun, EvaluateConfig
from compsae.evaluation.comparison.records import EvaluateOutputs
from compsae.evaluation.comparison.table import comparison_table, markdown_table, pair_score_figure
from compsae.files import COMPARISON_JSON, COMPARISON_MD, PAIR_SCORES_PNG
from compsae.registry import StageContext
from compsae.train.records import TrainOutputs


def run(cfg: EvaluateConfig, ctx: StageContext) -> EvaluateOutputs:
    """The stage: without ``cfg.runs``, every model of the train stage on the store it was trained
    on."""
    train = ctx.outputs("train", TrainOutputs)
    runs = cfg.runs or [
        EvalRun(label=name, checkpoint=rec.path, store=train.store)
        for name, rec in train.models.items()
    ]
    return EvaluateOutputs.model_validate(
        run_evaluate(
            cfg.model_copy(update={"runs": runs}),
            ctx.out_dir,
            trust_unverified=bool(ctx.option("trust_unverified")),
        )
    )


def run_evaluate(cfg: EvaluateConfig, out_dir: str, trust_unverified: bool = False) -> dict:
    """Evaluate every ``cfg.runs`` entry and write ``comparison.json`` + ``comparison.md`` in
    ``out_dir`` (checkpoints without any content digest only with ``trust_unverified``).

        Returns ``{"rows": [...], "outputs": [paths]}``.
    """
    if not cfg.runs:
        raise UserError(
            "evaluate.runs is empty: list {label, checkpoint, store} entries to compare"
        )
    rows = comparison_table([r.model_dump() for r in cfg.runs], cfg, trust_unverified)
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/{COMPARISON_JSON}", "w") as f:
        json.dump(rows, f, indent=1, default=float)
    with fs.open(f"{root}/{COMPARISON_MD}", "w") as f:
        f.write(markdown_table(rows) + "\n")
    outputs = [f"{out_dir}/{COMPARISON_JSON}", f"{out_dir}/{COMPARISON_MD}"]
    if pair_score_figure(rows, f"{out_dir}/{PAIR_SCORES_PNG}"):
        outputs.append(f"{out_dir}/{PAIR_SCORES_PNG}")
    return {"rows": rows, "outputs": outputs}
