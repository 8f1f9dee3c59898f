"""Run a grid and write its report: grid.json (every record), grid.md (table) and grid.png."""

from __future__ import annotations

import os
from typing import Any

from compsae import durable
from compsae.evaluation.composition_grid.grid import run_grid
from compsae.evaluation.composition_grid.summary import grid_figure, grid_table, worst_identifiable


def write_grid_report(
    name: str,
    folder: str,
    split: str = "all",
    progress: bool = True,
    composer: dict[str, Any] | None = None,
    device: str = "cpu",
    jobs: int = 1,
) -> dict[str, Any]:
    """Run (or reuse) the cells (`jobs` at once), write the report files into `folder`; return the
    headline."""
    records = list(run_grid(name, folder, split, progress, composer, device, jobs))
    reused = sum(r.pop("reused") for r in records)
    summary = {
        split_name: worst_identifiable(records, split_name)
        for split_name in ("validation", "test")
        if any(r["split"] == split_name for r in records)
    }
    tag = f"-{durable.json_digest(composer)[:8]}" if composer else ""
    durable.atomic_write_json(
        os.path.join(folder, f"grid{tag}.json"),
        {"summary": summary, "composer": composer or {}, "cells": records},
    )
    durable.atomic_write_text(os.path.join(folder, f"grid{tag}.md"), grid_table(records))
    shown = "test" if "test" in summary else next(iter(summary))
    grid_figure(records, os.path.join(folder, f"grid{tag}.png"), shown)
    head = summary[shown]
    line = f"{len(records)} cells ({reused} reused); {shown}: "
    line += f"{head['identifiable_cells']}/{head['cells']} identifiable"
    if head["identifiable_cells"]:
        worst = {m: f"{head[m]['worst_auc']:.3f}" for m in ("oracle", "topk", "compsae")}
        line += (
            f", worst AUC oracle {worst['oracle']}, TopK post-hoc {worst['topk']}, "
            f"CompSAE {worst['compsae']}; CompSAE beats TopK in {head['compsae_beats_topk']}"
        )
    return {"line": line, "report": os.path.join(folder, f"grid{tag}.md"), "summary": summary}
