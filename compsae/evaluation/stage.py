"""The ``evaluate`` stage entry: score checkpoints on ground-truth stores, write the table."""

from __future__ import annotations

import json
from typing import Any

import fsspec

from compsae.errors import UserError
from compsae.evaluation.comparison import comparison_table, markdown_table
from compsae.evaluation.config import EvaluateConfig
from compsae.files import COMPARISON_JSON, COMPARISON_MD


def run_evaluate(cfg: EvaluateConfig, out_dir: str, ctx: Any = None) -> dict:
    """Evaluate every ``cfg.runs`` entry and write ``comparison.json`` + ``comparison.md`` in ``out_dir``.

    ``ctx`` (the stage context) is accepted for the common stage signature and not needed here.
    Returns ``{"rows": [...], "outputs": [paths]}``.
    """
    if not cfg.runs:
        raise UserError("evaluate.runs is empty: list {label, checkpoint, store} entries to compare")
    rows = comparison_table([r.model_dump() for r in cfg.runs], cfg)
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/{COMPARISON_JSON}", "w") as f:
        json.dump(rows, f, indent=1, default=float)
    with fs.open(f"{root}/{COMPARISON_MD}", "w") as f:
        f.write(markdown_table(rows) + "\n")
    return {"rows": rows, "outputs": [f"{out_dir}/{COMPARISON_JSON}", f"{out_dir}/{COMPARISON_MD}"]}
