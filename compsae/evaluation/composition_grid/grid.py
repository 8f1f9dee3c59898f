"""A named grid of cells over the axes a real dictionary meets, split into validation and test.

Each cell varies one axis from the base design (one-at-a-time), so a failure points at its axis.
The validation split is every other cell at its validation seed (settings are chosen there); the
test split is every cell at another seed — the table that is reported.  Each cell's result is a
record (`cell.json`, keyed by the hash of its spec and of `GRID_FORMAT`): an unchanged cell is
reused, a killed grid resumes at the cell it was in (its trainings resume from their checkpoints).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from compsae import durable
from compsae.errors import UserError
from compsae.evaluation.composition_grid.cell import CellSpec, run_cell
from compsae.evaluation.composition_grid.design import PairGraphDesign
from compsae.threads import torch_threads

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

# The GPU grid: wider spaces, more features and pairs, larger k, eight times the training tokens
# (`compsae grid large --device cuda`); the same axes around a base cell four times wider.
LARGE_BASE = dict(d_model=256, n_features=1024, mean_active=6.0)
LARGE_AXES: dict[str, list[Any]] = {
    "design.d_model": [128, 512],
    "design.n_features": [2048, 4096],
    "dict_ratio": [0.5, 2.0],
    "k": [8, 32],
    "design.degree": [1, 8],
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
    """The cells of grid `name` ("default": base + every axis value, both splits; "large": the
    same around a wider base, for a GPU; "quick": three small cells at few tokens, for tests and a
    first look); `composer` fields override the shipped
    composer's in every cell (a changed field makes new cells, so both stay on disk)."""
    if name == "quick":
        base = CellSpec(
            design=PairGraphDesign(d_model=32, n_features=128),
            tokens=131_072,
            train_blocks=8,
            heldout_blocks=4,
        )
        points = [("base", "", None), ("strength=0", "design.strength", 0.0), ("k=4", "k", 4)]
    elif name in ("default", "large"):
        axes = AXES if name == "default" else LARGE_AXES
        base = CellSpec()
        if name == "large":
            base = CellSpec(
                design=PairGraphDesign(**LARGE_BASE),
                k=16,
                tokens=8 * base.tokens,
                train_blocks=64,
                heldout_blocks=32,
            )
        points = [("base", "", None)] + [
            (f"{axis.split('.')[-1]}={v}", axis, v) for axis, values in axes.items() for v in values
        ]
    else:
        raise UserError(f"unknown grid {name!r}: use default, large (for a GPU) or quick")
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


def _reused(folder: str, cell: Cell) -> dict[str, Any] | None:
    """The cell's stored record when its key still matches, else None."""
    path = os.path.join(_record_path(folder, cell), "cell.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    return record if record.get("key") == cell.key else None


def cell_result(folder: str, cell: Cell, progress: bool = False) -> tuple[dict[str, Any], bool]:
    """The cell's record, computed or reused; returns (record, reused)."""
    path = os.path.join(_record_path(folder, cell), "cell.json")
    stored = _reused(folder, cell)
    if stored is not None:
        return stored, True
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


def _cell_in_worker(folder: str, cell: Cell, threads: int) -> dict[str, Any]:
    """`cell_result` in a worker process, with `threads` torch threads for its trainings."""
    with torch_threads(threads):
        return cell_result(folder, cell)[0]


def _parallel(folder: str, cells: list[Cell], jobs: int) -> Iterator[tuple[Cell, dict[str, Any]]]:
    """Compute `cells` in `jobs` fresh worker processes (spawned: no torch state is inherited),
    the cores shared between them; yields (cell, record) as each finishes.  Every cell writes its
    own record, so a killed grid keeps what finished."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_cell_in_worker, folder, c, threads): c for c in cells}
        try:
            for done in as_completed(futures):
                yield futures[done], done.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def run_grid(
    name: str,
    folder: str,
    split: str = "all",
    progress: bool = True,
    composer: dict[str, Any] | None = None,
    device: str = "cpu",
    jobs: int = 1,
) -> Iterator[dict[str, Any]]:
    """Run (or reuse) every cell of grid `name` in `split` under `folder`, yielding the records
    (`device`: where the dictionaries train; a cell trained elsewhere is a cell of its own).
    `jobs` > 1 computes that many cells at once in worker processes (each with its share of the
    cores; memory grows with it), yielding the reused cells first and then the others in the
    grid's order once all are done."""
    cells = [c for c in grid_cells(name, composer) if split in ("all", c.split)]
    if device != "cpu":
        cells = [Cell(c.name, c.split, c.spec.model_copy(update={"device": device})) for c in cells]
    if not cells:
        raise UserError(f"grid {name!r} has no {split} cells: use validation, test or all")
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: use 1 or more cells at once")
    os.makedirs(folder, exist_ok=True)
    if jobs > 1:
        yield from _run_parallel(name, folder, cells, jobs, progress)
        return
    bar = tqdm(cells, desc=f"grid {name}", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(f"{cell.split} {cell.name}")
        record, reused = cell_result(folder, cell)
        record["reused"] = reused
        yield record


def _run_parallel(
    name: str, folder: str, cells: list[Cell], jobs: int, progress: bool
) -> Iterator[dict[str, Any]]:
    records: dict[int, dict[str, Any]] = {}
    todo = []
    for i, cell in enumerate(cells):
        record = _reused(folder, cell)
        if record is None:
            todo.append(cell)
        else:
            records[i] = {**record, "reused": True}
    bar = tqdm(
        total=len(cells),
        initial=len(records),
        desc=f"grid {name} ({jobs} at once)",
        unit="cell",
        disable=not progress,
        dynamic_ncols=True,
    )
    index = {id(c): i for i, c in enumerate(cells)}
    for cell, record in _parallel(folder, todo, jobs):
        records[index[id(cell)]] = {**record, "reused": False}
        bar.set_postfix_str(f"{cell.split} {cell.name}")
        bar.update(1)
    bar.close()
    for i in sorted(records):
        yield records[i]
