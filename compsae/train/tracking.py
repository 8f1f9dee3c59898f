"""Optional experiment tracking: Weights & Biases logging of what the trainer writes to
metrics.jsonl (`train.log: wandb`).  Off by default; `WANDB_MODE=offline` works without a network.

One W&B run per model, named after it, grouped by the train stage folder, in the project
`train.wandb_project` (default `compsae-<pipeline>`).  The run id is derived from the model's
config hash, so a resumed training continues the same run."""

from __future__ import annotations

import numbers
from typing import Any

from compsae.errors import UserError


class WandbTracker:
    """Logs every metrics record of one model's training to its W&B run."""

    def __init__(
        self,
        project: str,
        name: str,
        group: str,
        config: dict[str, Any],
        run_id: str,
        folder: str,
        entity: str | None = None,
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError(
                "train.log is wandb but wandb is not installed: pip install -e '.[wandb]' "
                "(or set train.log=none)"
            ) from None
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            group=group,
            config=config,
            id=run_id,
            resume="allow",
            dir=folder,
            reinit="finish_previous",
        )

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record, under `train/<key>`, at its step (tokens seen logged too)."""
        values = {
            f"train/{k}": v
            for k, v in record.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)
        }
        self.run.log(values, step=int(record["step"]))

    def summary(self, heldout: dict[str, Any]) -> None:
        """The held-out metrics of the finished model, as the run's summary `heldout/<key>`."""
        for k, v in heldout.items():
            if isinstance(v, numbers.Real) and not isinstance(v, bool):
                self.run.summary[f"heldout/{k}"] = v

    def finish(self) -> None:
        self.run.finish()


def make_tracker(
    kind: str,
    project: str,
    name: str,
    group: str,
    config: dict[str, Any],
    run_id: str,
    folder: str,
    entity: str | None = None,
) -> WandbTracker | None:
    """The tracker `train.log` asks for (None for "none")."""
    if kind == "none":
        return None
    return WandbTracker(project, name, group, config, run_id, folder, entity)
