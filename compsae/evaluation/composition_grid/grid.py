"""A named grid of cells over the axes a real dictionary meets, split into validation and test.

Each cell varies one axis from the base design (one-at-a-time), so a failure points at its axis.
The validation split is every other cell at its validation seed (settings are chosen there); the
test split is every cell at another seed — the table that is reported.  Each cell's result is a
record (`cell.json`, keyed by the hash of its spec and of `GRID_FORMAT`): an unchanged cell is
reused, a killed grid resumes at the cell it was in (its trainings resume from their checkpoints).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from compsae import durable
from compsae.errors import UserError
from compsae.evaluation.composition_grid.cell import CellSpec, run_cell
from compsae.evaluation.composition_grid.design import PairGraphDesign

GRID_FORMAT = "compsae-composition-grid/1"
VALIDATION_SEED, TEST_SEED = 1, 2

# axis -> the values beside the base cell's; "design." fields go to the data, the rest to the cell
AXES: dict[str, list[Any]] = {
    "design.d_model": [128, 256],
    "design.n_features": [512, 1024],
    "dict_ratio": [0.5, 2.0],
    "k": [4, 16],
    "design.degree": [1, 4],
    "design.pair_fraction": [0.5],
    "design.strength": [0.0, 0.005, 0.1],
    "design.rank": [2, 32],
    "design.cofire_prob": [0.001, 0.005],
    "design.magnitude_law": ["constant"],
}


@dataclass(frozen=True)
class Cell:
    """One named point of a grid at one seed."""

    name: str
    split: str
    spec: CellSpec

    @property
    def key(self) -> str:
        return durable.json_digest(
            {"format": GRID_FORMAT, "spec": self.spec.model_dump(mode="json")}
        )


def _with(base: CellSpec, axis: str, value: Any, seed: int) -> CellSpec:
    design = base.design.model_dump()
    cell = base.model_dump(exclude={"design"})
    if axis.startswith("design."):
        design[axis.split(".", 1)[1]] = value
    elif axis:
        cell[axis] = value
    design["seed"] = seed
    if axis == "design.d_model":  # a wider space holds proportionally more features
        design["n_features"] = base.design.n_features * value // base.design.d_model
    return CellSpec(design=PairGraphDesign(**design), **cell)


def grid_cells(name: str, composer: dict[str, Any] | None = None) -> list[Cell]:
    """The cells of grid `name` ("default": base + every axis value, both splits; "quick": three
    small cells at few tokens, for tests and a first look); `composer` fields override the shipped
    composer's in every cell (a changed field makes new cells, so both stay on disk)."""
    if name == "quick":
        base = CellSpec(
            design=PairGraphDesign(d_model=32, n_features=128),
            tokens=131_072,
            train_blocks=8,
            heldout_blocks=4,
        )
        points = [("base", "", None), ("strength=0", "design.strength", 0.0), ("k=4", "k", 4)]
    elif name == "default":
        base = CellSpec()
        points = [("base", "", None)] + [
            (f"{axis.split('.')[-1]}={v}", axis, v) for axis, values in AXES.items() for v in values
        ]
    else:
        raise UserError(f"unknown grid {name!r}: use default or quick")
    if composer:
        base = base.model_copy(update={"composer": dict(composer)})
    cells = []
    for i, (label, axis, value) in enumerate(points):
        if i % 2 == 0:
            cells.append(Cell(label, "validation", _with(base, axis, value, VALIDATION_SEED)))
        cells.append(Cell(label, "test", _with(base, axis, value, TEST_SEED)))
    return cells


def _record_path(folder: str, cell: Cell) -> str:
    safe = cell.name.replace("=", "-").replace(".", "_")
    variant = f"-{durable.json_digest(cell.spec.composer)[:8]}" if cell.spec.composer else ""
    where = "" if cell.spec.device == "cpu" else f"-{cell.spec.device}"
    return os.path.join(folder, f"{cell.split}-{safe}{variant}{where}")


def cell_result(folder: str, cell: Cell, progress: bool = False) -> tuple[dict[str, Any], bool]:
    """The cell's record, computed or reused; returns (record, reused)."""
    path = os.path.join(_record_path(folder, cell), "cell.json")
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        if record.get("key") == cell.key:
            return record, True
    result = run_cell(cell.spec, _record_path(folder, cell), progress)
    record = {
        "format": GRID_FORMAT,
        "key": cell.key,
        "name": cell.name,
        "split": cell.split,
        "spec": cell.spec.model_dump(mode="json"),
        "result": result,
    }
    durable.atomic_write_json(path, record)
    return record, False


def run_grid(
    name: str,
    folder: str,
    split: str = "all",
    progress: bool = True,
    composer: dict[str, Any] | None = None,
    device: str = "cpu",
) -> Iterator[dict[str, Any]]:
    """Run (or reuse) every cell of grid `name` in `split` under `folder`, yielding the records
    (`device`: where the dictionaries train; a cell trained elsewhere is a cell of its own)."""
    cells = [c for c in grid_cells(name, composer) if split in ("all", c.split)]
    if device != "cpu":
        cells = [Cell(c.name, c.split, c.spec.model_copy(update={"device": device})) for c in cells]
    if not cells:
        raise UserError(f"grid {name!r} has no {split} cells: use validation, test or all")
    os.makedirs(folder, exist_ok=True)
    bar = tqdm(cells, desc=f"grid {name}", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(f"{cell.split} {cell.name}")
        record, reused = cell_result(folder, cell)
        record["reused"] = reused
        yield record
