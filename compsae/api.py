"""The public Python API: open a store, load trained SAEs.

Units: every function takes and returns activations in store units (the values the harvest wrote);
the per-model normalization a checkpoint records is applied and undone inside.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compsae.store.activation_store import ActivationStore
    from compsae.train.trained import TrainedSAE


def open_store(url: str) -> ActivationStore:
    """Open a harvested activation store (a local folder or an fsspec URL) read-only."""
    # imported here so that `import compsae` stays cheap (zarr / torch load on first use)
    from compsae.store.activation_store import ActivationStore

    return ActivationStore.open(url, "r")


def load_sae(folder: str, device: str = "cpu") -> TrainedSAE:
    """Load one trained model folder (`runs/<pipeline>/train-<hash>/<model>`) in eval mode.

    Its `reconstruct(x)` takes and returns store units.
    """
    from compsae.train.trained import TrainedSAE

    return TrainedSAE.load(folder, device)


def load_saes(train_dir: str, device: str = "cpu") -> list[TrainedSAE]:
    """Load every model of a train stage folder (`runs/<pipeline>/train-<hash>`)."""
    from compsae.train.trained import load_trained

    return load_trained(train_dir, device)
