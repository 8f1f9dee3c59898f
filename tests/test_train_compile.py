"""`train.compile`: the compiled step trains like the eager one (same losses up to float rounding),
its checkpoints load without compile, the setting is not hashed, and AuxK's compile form equals
the eager one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import HOOK, model_cfg, sparse_mixture

from compsae.errors import UserError
from compsae.stages import stage_hash
from compsae.train.checkpoint import load_model
from compsae.train.compiled import CompiledLoss, compile_mode
from compsae.train.config import TrainConfig, TrainStageConfig
from compsae.train.models import build_model
from compsae.train.models.topk import _auxk_loss_static, auxk_loss
from compsae.train.records import CheckpointMeta
from compsae.train.run import training_hash
from compsae.train.trainer import Trainer

SMALL = {"n_latents": 64, "k": 4, "d_f": 16, "d_c": 8, "n_heads": 4, "aux_k": 16, "pair_rank": 8}


def test_compile_setting_round_trips_and_leaves_the_hashes_alone():
    base = TrainStageConfig(hook=HOOK, models={"comp": model_cfg("compsae", **SMALL)})
    on = TrainStageConfig.model_validate({**base.model_dump(), "compile": True})
    assert on.compile and on.train_for("comp").compile and not base.compile
    assert TrainStageConfig.model_validate_json(on.model_dump_json()) == on
    # a per-model override works like any other training setting
    mixed = TrainStageConfig(
        hook=HOOK, models={"comp": model_cfg("compsae", **SMALL, train={"compile": True})}
    )
    assert mixed.train_for("comp").compile
    assert stage_hash("train", on, {}) == stage_hash("train", base, {})
    mcfg = base.model_for("comp")
    assert training_hash(mcfg, on.train_for("comp"), HOOK, "s") == training_hash(
        mcfg, base.train_for("comp"), HOOK, "s"
    )
    assert (
        compile_mode(torch.device("cuda")) == "reduce-overhead"
        and compile_mode(torch.device("cpu")) == "default"
    )
    assert (
        compile_mode(torch.device("cuda"), data_parallel=True) == "default"
    )  # no CUDA graphs around DDP's hooks


@pytest.mark.parametrize("n_dead", [0, 5, 16, 40])
def test_auxk_compile_form_equals_the_eager_one(n_dead):
    torch.manual_seed(n_dead)
    pre = torch.randn(32, 64, requires_grad=True)
    w_dec = torch.randn(64, 16, requires_grad=True)
    residual = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    losses, grads = [], []
    for fn in (auxk_loss, _auxk_loss_static):
        loss = fn(pre, residual, w_dec, dead, 16)
        losses.append(loss.detach())
        if loss.requires_grad:
            grads.append(
                torch.autograd.grad(loss, [pre, w_dec], allow_unused=True, materialize_grads=True)
            )
        else:  # the eager form's constant 0 (no dead latent)
            grads.append((torch.zeros_like(pre), torch.zeros_like(w_dec)))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    assert (losses[0] == 0) == (n_dead == 0)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_without_a_cpp_compiler_is_one_line(tmp_path, monkeypatch):
    import compsae.train.compiled as compiled

    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    mcfg = model_cfg("topk", **SMALL)
    tcfg = TrainConfig(batch_size=32, tokens=64, device="cpu", compile=True)
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler.*train.compile=false") as err:
        Trainer(
            build_model(mcfg, 16),
            mcfg,
            tcfg,
            str(tmp_path / "m"),
            CheckpointMeta.start(mcfg, 16, config_hash="x"),
            progress=False,
        )
    assert "\n" not in str(err.value)


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("clang++") is None, reason="no C++ compiler"
)
def test_compiled_trainer_keeps_the_models_checkpoint_keys(tmp_path):
    mcfg = model_cfg("compsae", **SMALL, composer="pair")
    model = build_model(mcfg, 16)
    names = set(model.state_dict())
    tcfg = TrainConfig(batch_size=32, tokens=64, device="cpu", compile=True)
    trainer = Trainer(
        model,
        mcfg,
        tcfg,
        str(tmp_path / "m"),
        CheckpointMeta.start(mcfg, 16, config_hash="x"),
        progress=False,
    )
    assert isinstance(
        trainer.loss_step, CompiledLoss
    )  # compiles lazily: nothing is built before a step
    trainer.save(finished=False)
    assert set(load_file(tmp_path / "m" / "model.safetensors")) == names
    loaded, _ = load_model(str(tmp_path / "m"))
    assert set(loaded.state_dict()) == names


def _train(folder, compile: bool, kind: str, device: str = "cpu"):
    # 24 steps cover every schedule change: k anneals 16 -> 4, the curriculum moves m through its
    # three values (pair: 1 -> 2 -> 3, top-m selection), the pair term joins and its penalties warm
    # up; AuxK sees a dead mask that changes (small window) and the last batch of the data is
    # smaller (an odd batch size).
    x, _ = sparse_mixture(1000, d=16, seed=3)
    data = torch.from_numpy(x)
    extra = {
        "pair": {"composer": "pair", "pair_selection": "top_m", "curriculum_m": [1, 2, 3]},
        "attention": {"composer": "attention"},
    }.get(kind, {})
    mcfg = model_cfg("compsae" if extra else kind, **SMALL, **extra)
    tcfg = TrainConfig(
        lr=3e-3,
        batch_size=45,
        tokens=45 * 24,
        log_every=1,
        checkpoint_every=1000,
        device=device,
        dead_window_tokens=200,
        compile=compile,
    )
    torch.manual_seed(0)
    model = build_model(mcfg, 16)
    trainer = Trainer(
        model,
        mcfg,
        tcfg,
        str(folder),
        CheckpointMeta.start(mcfg, 16, config_hash="x"),
        progress=False,
    )
    batches = [data[i : i + 45] for i in range(0, 990, 45)] + [
        data[990:],
        data[:45],
    ]  # step 23 has 10 rows
    trainer.fit(iter(batches))
    return [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize(
    ("kind", "device"),
    [
        pytest.param("pair", "cpu", marks=pytest.mark.slow),
        pytest.param("topk", "cpu", marks=pytest.mark.slow),
        pytest.param("attention", "cpu", marks=pytest.mark.slow),
        # CUDA graphs (reduce-overhead): benchmarks/gpu.sh runs these where a GPU is lent
        pytest.param("pair", "cuda", marks=_CUDA),
        pytest.param("topk", "cuda", marks=_CUDA),
        pytest.param("attention", "cuda", marks=_CUDA),
    ],
)
def test_compiled_training_matches_eager(tmp_path, kind, device):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _train(tmp_path / "eager", False, kind, device)
    compiled = _train(tmp_path / "compiled", True, kind, device)
    assert [r["step"] for r in compiled] == list(range(1, 25))
    # not bitwise: inductor fuses and reorders float sums (CUDA: other reduction orders again)
    rel = 1e-4 if device == "cpu" else 1e-3
    for name in ("loss", "recon", "auxk", "fvu"):
        a, b = [r[name] for r in eager], [r[name] for r in compiled]
        assert a == pytest.approx(b, rel=rel, abs=1e-6), name
    assert any(r["auxk"] > 0 for r in eager) and len({r["k"] for r in eager}) > 2
    if kind != "topk":
        assert len({r["m"] for r in eager}) == 3 and (
            kind != "pair" or any("pair_l1" in r for r in eager)
        )
    # schedule changes recompile a bounded number of times, never once per step (the attention
    # composer's step is compiled in pieces around its eager attention node, each recompiling alike)
    assert 1 <= counters["stats"]["unique_graphs"] <= (10 if kind != "attention" else 24), dict(
        counters["stats"]
    )
    assert counters["frames"]["ok"] == counters["frames"]["total"] > 0, dict(counters["frames"])
    # the compiled run's checkpoint loads into a plain model and equals the eager weights
    a, _ = load_model(str(tmp_path / "eager"))
    b, _ = load_model(str(tmp_path / "compiled"))
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=10 * rel, atol=1e-5)


@pytest.mark.slow
def test_compiled_data_parallel_training_matches_one_eager_process(tmp_path):
    """`torchrun --nproc-per-node 2` with train.compile (the DistributedDataParallel module
    compiled) trains the weights one eager process does."""
    from test_train_ddp import _cfg, torchrun
    from train_fixtures import make_store

    from compsae.train.run import run_train

    store, _ = make_store(str(tmp_path / "s.zarr"), n=1024)
    models = {
        "topk": model_cfg("topk", **SMALL),
        "pair": model_cfg("compsae", **SMALL, composer="pair"),
    }
    cfg = _cfg().model_copy(update={"models": models, "compile": True})
    torchrun(cfg, store.url, tmp_path, timeout=600)
    torch.set_num_threads(1)
    run_train(
        cfg.model_copy(update={"compile": False}),
        store.url,
        str(tmp_path / "single"),
        progress=False,
    )
    for name in models:
        a = load_file(tmp_path / "single" / name / "model.safetensors")
        b = load_file(tmp_path / "ddp" / name / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
