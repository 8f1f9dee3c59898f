"""On a GPU a training step reads nothing back to the host between log steps, so the host queues
the next steps while the GPU runs (a small SAE's step is launch-bound).  Runs where CUDA is
visible (`benchmarks/gpu.sh`); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
from test_train import SMALL
from train_fixtures import model_cfg

from compsae.train.config import TrainConfig
from compsae.train.models import build_model
from compsae.train.records import CheckpointMeta
from compsae.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("kind", ["topk", "compsae"])
def test_training_steps_between_log_steps_do_not_sync(tmp_path, kind: str) -> None:
    mcfg = model_cfg(kind, **SMALL)
    tcfg = TrainConfig(
        batch_size=64,
        tokens=64 * 40,
        log_every=1000,
        checkpoint_every=1000,
        device="cuda",
        dead_window_tokens=64 * 3,
    )  # latents die early: AuxK runs in the checked steps
    trainer = Trainer(
        build_model(mcfg, 16),
        mcfg,
        tcfg,
        str(tmp_path / kind),
        CheckpointMeta.start(mcfg, 16, config_hash="x"),
        progress=False,
    )
    xs = [torch.randn(64, 16, device="cuda") for _ in range(40)]
    for x in xs[:5]:  # warm-up: b_dec's initialisation, allocator, first kernels
        if trainer.step == 0:
            trainer.model.init_b_dec(x)
        trainer._train_step(x, x.shape[0])
        trainer.step += 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host read of a CUDA value now raises
    try:
        for x in xs[5:]:
            trainer._train_step(x, x.shape[0])
            trainer.step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.check_finite()
