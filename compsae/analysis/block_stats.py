"""The statistics of one block of store rows, for every reconstructor at once.

`block_partial` is the unit of work of both the Dask path and the plain reference loop: it takes a
block of activations, keeps the held-out rows, runs each reconstructor once and returns one
mergeable partial per model (see `reconstruction.merge_partials`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np

from compsae.analysis.composition import GateSums, HeadSums, PairSums, active_ids
from compsae.analysis.reconstruction import LatentSums, ReconSums, TopContexts, merge_partials
from compsae.analysis.reconstructors import Reconstructor
from compsae.threads import torch_threads


@dataclass
class BlockSpec:
    """What to compute per block.  `tracked[name]`: latent ids whose pair statistics are kept
    (CompSAE-like models only); `contexts_for`: models whose top contexts are kept; `pair_null`:
    also the null sums of the label-free pair calls; `include_sequence_start`: count position-0
    rows in the top contexts and the composition statistics (pairs, pair effects, heads, gate)."""

    top_k_contexts: int = 20
    skip: frozenset[str] = frozenset()
    tracked: dict[str, np.ndarray] = field(default_factory=dict)
    contexts_for: frozenset[str] = frozenset()
    pair_null: bool = True  # also measure pair effects on additive null rows (label-free calls)
    include_sequence_start: bool = False

    def rows_map(self, name: str, n_latents: int) -> np.ndarray | None:
        """`[n_latents]` latent -> tracked row (−1 untracked), or None when not tracked."""
        ids = self.tracked.get(name)
        if ids is None:
            return None
        rows = np.full(n_latents, -1, np.int64)
        rows[ids] = np.arange(len(ids))
        return rows


def model_partial(
    rec_fn: Reconstructor, x: np.ndarray, pos: np.ndarray, rows: np.ndarray, spec: BlockSpec
) -> dict[str, Any]:
    """Partials of one model on held-out rows `x: [b, d]` at positions `pos: [b]`, store rows `rows:
    [b]`."""
    rows_map = spec.rows_map(rec_fn.name, rec_fn.n_latents)
    effects = null = None
    bos = pos == 0
    # the rows behind the top contexts and the composition statistics: a sequence's first token
    # (BOS) fires latents of its own and would crowd them out unless asked for
    shown = np.ones(len(pos), dtype=bool) if spec.include_sequence_start else ~bos
    if rows_map is not None and "pairs" not in spec.skip and hasattr(rec_fn, "reconstruct"):
        # composition measured by intervention (mixed differences), for every composition model,
        # from the same forward as the reconstruction
        # the null's permutation is seeded by the block's first store row: the same for every
        # scheduler and worker count
        seed = int(rows[0]) if spec.pair_null and len(rows) else None
        rec, effects, null = rec_fn.reconstruct(
            x, rows_map, len(spec.tracked[rec_fn.name]), null_seed=seed, effect_rows=shown
        )
    else:
        rec = rec_fn(x)
    l0 = (rec.z != 0).sum(1)
    off = rec.x_hat_off
    part: dict[str, Any] = {
        "bos": ReconSums.from_batch(
            x[bos], rec.x_hat[bos], l0[bos], None if off is None else off[bos]
        ),
        "rest": ReconSums.from_batch(
            x[~bos], rec.x_hat[~bos], l0[~bos], None if off is None else off[~bos]
        ),
    }
    if "latents" not in spec.skip:
        part["latents"] = LatentSums.from_codes(rec.z)
    # one copy of the dense codes for every view below (none when every row is shown)
    z_shown = rec.z if spec.include_sequence_start else rec.z[shown]
    if rec_fn.name in spec.contexts_for and "contexts" not in spec.skip and spec.top_k_contexts > 0:
        part["top"] = TopContexts.from_codes(z_shown, rows[shown], spec.top_k_contexts)
    if rows_map is not None and "pairs" not in spec.skip:
        # firing counts over the same rows as the pair counts (NPMI / PMI need both)
        part["pair_latents"] = LatentSums.from_codes(z_shown)
    if rec.attn is not None and rec.active_idx is not None:
        active = active_ids(rec.active_idx[shown], z_shown)
        if "heads" not in spec.skip:
            part["heads"] = HeadSums.from_block(active, rec.attn[shown])
        if rows_map is not None and "pairs" not in spec.skip:
            part["pairs"] = PairSums.from_block(
                active, rec.attn[shown], rows_map, len(spec.tracked[rec_fn.name])
            )
    if effects is not None:
        part["effects"] = effects
    if null is not None:
        part["null_effects"] = null
    if rec.gate is not None and "gate" not in spec.skip:
        part["gate"] = GateSums.from_block(rec.gate[shown])
    return part


def block_partial(
    x: np.ndarray,
    keep: np.ndarray,
    pos: np.ndarray,
    row0: int,
    recons: list[Reconstructor],
    spec: BlockSpec,
) -> dict[str, dict[str, Any]] | None:
    """Partials of every model on one block: `x: [rows, d]` from store row `row0`, `keep: [rows]`
    the held-out rows to evaluate, `pos: [rows]` their positions.  None when nothing is kept."""
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return None
    # One torch thread per task: parallelism comes from the scheduler, and a fixed thread count
    # keeps every float identical whichever scheduler runs the block.  Scoped: the worker's own
    # count comes back when the block is done.
    x = np.asarray(x, np.float32)[idx]
    with torch_threads(1):
        return {r.name: model_partial(r, x, np.asarray(pos)[idx], row0 + idx, spec) for r in recons}


def merge_many(parts: list[Any]) -> Any:
    """Left fold of `merge_partials` over `parts` (in order)."""
    return reduce(merge_partials, parts, None)
