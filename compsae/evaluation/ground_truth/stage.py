"""The data stage of a ground-truth pipeline (`compsae.registry`): instead of harvesting an LM,
write synthetic activations with known features into `<stage folder>/store.zarr`."""

from __future__ import annotations

from compsae.evaluation.ground_truth.config import GroundTruthConfig
from compsae.evaluation.ground_truth.design import write_ground_truth_store
from compsae.files import STORE_DIR
from compsae.harvest.records import HarvestOutputs
from compsae.registry import StageContext
from compsae.stages import join
from compsae.store import ActivationStore, manifest_digest


def run(cfg: GroundTruthConfig, ctx: StageContext) -> HarvestOutputs:
    """Write the ground-truth store; later stages read it as they read a harvest."""
    url = join(ctx.out_dir, STORE_DIR)
    summary = write_ground_truth_store(cfg, url, overwrite=ctx.force)
    store = ActivationStore.open(url)
    return HarvestOutputs.model_validate(
        {
            **summary,
            "store": url,
            "hooks": {cfg.hook: cfg.d_model},
            "digest": manifest_digest(store.manifest),
        }
    )
