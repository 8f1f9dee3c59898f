"""The public Python API: open a store, load trained SAEs.

Units: every function takes and returns activations in store units (the values the harvest wrote);
the per-model normalization a checkpoint records is applied and undone inside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel

    from compsae.stages import StageRecord
    from compsae.store.activation_store import ActivationStore
    from compsae.train.trained import TrainedSAE

METRICS_FILE = "metrics.json"
_STAGE_OUTPUTS = {
    "harvest": "compsae.harvest.records:HarvestOutputs",
    "train": "compsae.train.records:TrainOutputs",
    "analyze": "compsae.analysis.records:AnalyzeOutputs",
    "evaluate": "compsae.evaluation.comparison.records:EvaluateOutputs",
    "probe": "compsae.evaluation.probes.records:ProbeOutputs",
}
# the pair sums are [n_latents, n_latents] float64 arrays (three of them): keep them in memory
# bounds
_MAX_PAIR_LATENTS = 4096


def open_store(url: str) -> ActivationStore:
    """Open a harvested activation store (a local folder or an fsspec URL) read-only."""
    # imported here so that `import compsae` stays cheap (zarr / torch load on first use)
    from compsae.store.activation_store import ActivationStore

    return ActivationStore.open(url, "r")


def load_sae(folder: str, device: str = "cpu", trust_unverified: bool = False) -> TrainedSAE:
    """Load one trained model folder (`runs/<pipeline>/train-<hash>/<model>`) in eval mode.

    Its `reconstruct(x)` takes and returns store units.  The weights are checked against the
    checkpoint's content digest; a checkpoint with none (from elsewhere, or an older compsae) is
    refused unless `trust_unverified=True`, which loads it with a warning.
    """
    from compsae.train.trained import TrainedSAE

    return TrainedSAE.load(folder, device, trust_unverified=trust_unverified)


def load_saes(
    train_dir: str, device: str = "cpu", trust_unverified: bool = False
) -> list[TrainedSAE]:
    """Load every model of a train stage folder (`runs/<pipeline>/train-<hash>`); see `load_sae`
    for `trust_unverified`."""
    from compsae.train.trained import load_trained

    return load_trained(train_dir, device, trust_unverified=trust_unverified)


@dataclass(frozen=True)
class PairRow:
    """One composing pair, as the report's table lists it.  `i`, `j`: the latent ids (i < j);
    `tokens`: held-out tokens where both fire; `mean_effect`: mean ‖x̂(z) − x̂(z∖i) − x̂(z∖j) +
    x̂(z∖ij)‖ over those tokens, relative to the RMS row deviation of the data (unitless);
    `gain_share`: the reconstruction gain of keeping the pair's term, as a share of the total
    variance (unitless)."""

    model: str
    i: int
    j: int
    tokens: int
    mean_effect: float
    gain_share: float


def top_pairs(
    run_or_model: str | TrainedSAE,
    n: int = 20,
    store: ActivationStore | str | None = None,
    max_rows: int = 65_536,
    batch_size: int = 512,
) -> list[PairRow]:
    """The `n` composing pairs that explain most variance, best first.

    `run_or_model` is a run folder (`runs/<pipeline>`: its newest analyze stage is read), an analyze
    stage folder or its metrics.json; the rows then come from every model of that run, at most the
    20 per model that analyze kept.  Or it is a loaded `TrainedSAE` with `store`: the pairs are then
    measured by intervention on up to `max_rows` of the checkpoint's held-out rows."""
    if isinstance(run_or_model, str):
        return _pairs_of_metrics(_metrics_file(run_or_model), n)
    if store is None:
        raise ValueError("top_pairs of a model needs the store to measure it on")
    return _pairs_of_model(run_or_model, store, n, max_rows, batch_size)


def _metrics_file(path: str) -> str:
    """metrics.json of `path`: the file itself, an analyze folder, or a run's newest analyze
    folder."""
    import fsspec

    from compsae.errors import UserError

    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    if root.endswith(METRICS_FILE) and fs.isfile(root):
        return root
    if fs.isfile(f"{root}/{METRICS_FILE}"):
        return f"{root}/{METRICS_FILE}"
    found = fs.glob(f"{root}/analyze-*/{METRICS_FILE}")
    if not found:
        raise UserError(
            f"no {METRICS_FILE} in {path} or its analyze-* folders; run `compsae analyze`"
        )
    # the newest analyze stage: the one the last run wrote
    return max(found, key=lambda f: fs.info(f).get("mtime") or fs.info(f).get("LastModified") or 0)


def _pairs_of_metrics(metrics_path: str, n: int) -> list[PairRow]:
    import json

    import fsspec

    with fsspec.open(metrics_path, "r") as f:
        metrics = json.load(f)
    rows = [
        PairRow(
            name,
            int(p["i"]),
            int(p["j"]),
            int(p["tokens"]),
            float(p["mean_effect"]),
            float(p["gain_share"]),
        )
        for name, m in metrics.get("models", {}).items()
        for p in m.get("pairs", {}).get("top_pairs", [])
    ]
    return sorted(rows, key=lambda r: -r.gain_share)[:n]


def _pairs_of_model(
    sae: TrainedSAE, store: ActivationStore | str, n: int, max_rows: int, batch_size: int
) -> list[PairRow]:
    """The pair table of `sae` measured on its held-out rows of `store`, as analyze measures it:
    per pair of latents both firing, the count, Σ‖Δ‖ and Σ gain, with gain = ‖r + Δ‖² − ‖r‖²
    (r = x − x̂); effects relative to the RMS row deviation, gains as a share of Σ‖x − μ‖²."""
    import numpy as np
    import torch

    from compsae.errors import UserError

    m = sae.n_latents
    if m > _MAX_PAIR_LATENTS:
        raise UserError(
            f"{sae.name} has {m} latents: its pair table is measured by "
            "`compsae analyze` (top_pairs of the run folder)"
        )
    if not sae.has_composition:
        return []  # an additive decoder: every mixed difference is 0
    count, norm, gain = np.zeros(m * m), np.zeros(m * m), np.zeros(m * m)
    seen, sq_dev = 0, 0.0
    # a store with fewer held-out rows than one batch is measured in one smaller batch
    rows = sae.batches(store, batch_size=1, shuffle=False).n_rows
    for x in sae.batches(store, batch_size=max(1, min(batch_size, rows)), shuffle=False):
        x = x[: max_rows - seen].to(sae.device)
        codes = sae.encode(x)
        eff = sae.pair_effects(x)  # store units, like x and the residual
        resid = (x - sae.decode(codes)).double()
        delta = eff.delta.double()
        g = 2 * torch.einsum("bd,bpd->bp", resid, delta) + delta.square().sum(-1)
        vals = codes.z.gather(1, eff.latents.flatten(1)).view(eff.latents.shape)  # [b, P, 2]
        keep = (vals > 0).all(-1)
        lo, hi = eff.latents.min(-1).values[keep], eff.latents.max(-1).values[keep]
        flat = (lo * m + hi).cpu().numpy()
        count += np.bincount(flat, minlength=m * m)
        norm += np.bincount(flat, weights=delta.norm(dim=-1)[keep].cpu().numpy(), minlength=m * m)
        gain += np.bincount(flat, weights=g[keep].cpu().numpy(), minlength=m * m)
        sq_dev += float((x - x.mean(0)).double().square().sum())
        seen += x.shape[0]
        if seen >= max_rows:
            break
    rms = float(np.sqrt(sq_dev / max(seen, 1))) or 1.0
    share = gain / max(sq_dev, 1e-30)
    order = np.argsort(-share)[:n]
    return [
        PairRow(
            sae.name,
            int(f // m),
            int(f % m),
            int(count[f]),
            float(norm[f] / count[f] / rms),
            float(share[f]),
        )
        for f in order
        if share[f] > 0 and count[f] > 0
    ]


def stage_outputs_model(stage: str) -> type[BaseModel]:
    """The outputs record model of `stage` (what its `stage.json` holds under "outputs")."""
    import importlib

    from compsae.errors import UserError

    if stage not in _STAGE_OUTPUTS:
        raise UserError(f"unknown stage {stage!r}; stages are {', '.join(_STAGE_OUTPUTS)}")
    # by name, like the registry's runners: `compsae` itself must not import the stages' packages
    module, _, name = _STAGE_OUTPUTS[stage].partition(":")
    return getattr(importlib.import_module(module), name)


def run_stage(
    pipeline: str,
    stage: str,
    config: str = "pipelines.yaml",
    runs_root: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    say: Callable[[str], object] = print,
) -> StageRecord[Any]:
    """Run (or reuse) one stage of `pipeline` from `config`, as `compsae <stage> --pipeline ...`
    does, and return its typed record (`.outputs` is the stage's outputs model, e.g.
    `TrainOutputs`). `overrides` are `--set` strings (`train.models.compsae.k=16`); `runs_root`
    replaces the file's runs root."""
    from compsae.pipeline.config import load_pipeline
    from compsae.pipeline.runner import run_stage as run_one
    from compsae.stages import StageRecord

    sets = [*(overrides or []), *([f"runs_root={runs_root}"] if runs_root is not None else [])]
    whole, pipe = load_pipeline(pipeline, config, sets)
    status = run_one(stage, whole, pipe, pipeline, force=force, say=say)
    return StageRecord[stage_outputs_model(stage)].model_validate(status.record)  # type: ignore[misc]
