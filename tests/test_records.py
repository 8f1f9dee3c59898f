"""The typed records between stages: per-kind model configs (a TopK config carries no composer),
and checkpoints written before the records existed still load."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from compsae.train.checkpoint import save_checkpoint
from compsae.train.config import (
    CompSAEConfig,
    ReLUConfig,
    TopKConfig,
    TrainStageConfig,
    make_model_config,
)
from compsae.train.models import build_model
from compsae.train.trained import TrainedSAE

D = 8
# every setting every kind carried before the per-kind configs (the dump of the old ModelConfig)
OLD_FIELDS = {
    "n_latents": 16,
    "k": 2,
    "composer": "attention",
    "d_f": 8,
    "d_c": 4,
    "n_heads": 2,
    "ffn_mult": 2,
    "gate": True,
    "pair_rank": 64,
    "pair_selection": "all",
    "pair_l1": 0.0,
    "pair_l1_warmup_fraction": 0.2,
    "curriculum": True,
    "curriculum_m": [2, 3, 4],
    "curriculum_at": [0.2, 0.4],
    "graduated_sparsity": True,
    "k_start": None,
    "k_anneal_fraction": 0.3,
    "aux_k": 256,
    "aux_coef": 1 / 32,
    "l1_coef": 5.0,
    "l1_warmup_fraction": 0.05,
    "b_dec_init": "geometric_median",
    "unit_norm_decoder": True,
    "train": {},
}


def test_each_kind_has_only_its_own_settings() -> None:
    assert isinstance(make_model_config(type="topk"), TopKConfig)
    assert isinstance(make_model_config(), CompSAEConfig)  # no type: a CompSAE, as before
    assert isinstance(make_model_config(type="relu"), ReLUConfig)
    with pytest.raises(ValidationError, match="composer"):
        make_model_config(type="topk", composer="attention")
    with pytest.raises(ValidationError, match="l1_coef"):
        make_model_config(type="topk", l1_coef=1.0)
    with pytest.raises(ValidationError, match="composer"):
        TrainStageConfig(hook="h", models={"t": {"type": "topk", "composer": "mlp"}})
    assert "composer" not in make_model_config(type="topk").model_dump()


@pytest.mark.parametrize("kind", ["topk", "relu", "compsae"])
def test_a_checkpoint_of_the_old_format_loads(tmp_path, kind) -> None:
    torch.manual_seed(0)
    comp = {"d_f": 8, "d_c": 4, "n_heads": 2, "composer": "attention"} if kind == "compsae" else {}
    cfg = make_model_config(type=kind, n_latents=16, k=2, **comp)
    model = build_model(cfg, D)
    old_meta = {
        "model": {**OLD_FIELDS, "type": kind},
        "type": kind,
        "d_in": D,
        "hook": "h",
        "step": 3,
        "tokens_seen": 30,
        "finished": True,
        "normalization": {"scale": 2.0},
        "train": {"heldout_fraction": 0.1, "seed": 4},
    }  # no split record: held out with seed 0
    save_checkpoint(str(tmp_path / kind), model, old_meta)
    sae = TrainedSAE.load(str(tmp_path / kind))
    assert type(sae.meta.model) is type(cfg) and sae.meta.model.n_latents == 16
    assert sae.split is not None and (sae.split.fraction, sae.split.seed) == (0.1, 0)
    x = torch.randn(5, D)
    torch.testing.assert_close(sae.reconstruct(x), model.eval()(x * 2.0).x_hat / 2.0)
    assert sae.has_composition == (kind == "compsae")
