"""The harvest stage: run a language model over text and store per-token hook activations.

Entry point `run_harvest(cfg, out_dir, force)`; `synthetic_text` is shared with the evaluation
stage.
"""

from compsae.harvest.config import DataConfig, HarvestConfig

__all__ = ["DataConfig", "HarvestConfig"]
