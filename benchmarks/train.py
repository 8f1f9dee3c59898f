"""Train-stage benchmark, all in one run on one synthetic store (d_model 512, float16):

(a) loader rows/s against reading the same bytes as a raw numpy memmap (random 512-row batches
    converted to float32)                                     -> RESULT loader_vs_memmap (goal >=
    0.8)
(b) one training step of CompSAE against TopKSAE at the same n_latents and k, for every composer
    kind of the config schema (time ratio, curriculum at its final m)
                                 -> RESULT compsae_step_vs_topk_<kind> (goal <= 1.5);
                                 compsae_step_vs_topk
                                    is the default composer's
(c) loader rows/s against CompSAE training rows/s              -> RESULT loader_vs_train (must be >
1) (e) the trainer's own step (`Trainer._train_step`: schedules, loss terms, dead-latent counts,
    the optimizer) against the bare step of (b), each run back to back with one wait for the device
    at the end, as training runs between log steps: what the trainer's bookkeeping costs, and on a
    GPU whether it lets the host queue ahead      -> RESULT trainer_vs_bare_step_<model> (topk, the
    default composer)
(d) with --compile: (b) again with every step compiled as `train.compile` does it (CUDA graphs on
    CUDA), compiled CompSAE against compiled TopK    -> RESULT compsae_step_vs_topk_compiled_<kind>
    and each model's eager step time over its compiled one -> RESULT step_eager_vs_compiled_<model>;
    the first step's loss compiled against eager, same weights -> RESULT
    compiled_vs_eager_loss_max_rel_diff (compilation and CUDA-graph recording are warm-up steps, not
    timed)

Usage: python benchmarks/train.py [--quick] [--rows N] [--steps N] [--threads N] [--device cuda]
[--compile]

The loader always runs on the CPU (it feeds the trainer from there); `--device` is where the
training steps in (b) and (c) run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compsae.errors import UserError
from compsae.store import ActivationStore, StoreLayout
from compsae.store.loader import BatchLoader
from compsae.train.compiled import compile_mode, loss_step
from compsae.train.config import CompSAEConfig, TrainConfig, make_model_config
from compsae.train.distributed import DistContext, wrap_loss
from compsae.train.models import build_model
from compsae.train.records import CheckpointMeta
from compsae.train.trainer import Trainer, resolve_device

HOOK = "blocks.3.hook_resid_post"
D = 512
BATCH = 512


def make_store(root: Path, n_rows: int) -> tuple[ActivationStore, np.ndarray]:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(n_rows, D)) * 2).astype(np.float16)
    layout = StoreLayout(chunk_rows=1024, shard_rows=16384, dtype="float16")
    st = ActivationStore.create(
        str(root / "s.zarr"), {HOOK: D}, n_rows, layout, {"config_hash": "bench"}
    )
    for s in range(st.n_shards):
        lo, hi = st.shard_range(s)
        rows = np.arange(lo, hi)
        st.write_shard(s, {HOOK: x[lo:hi]}, rows % 1000, rows // 128, rows % 128)
    st.finalize()
    return ActivationStore.open(st.url), x


def loader_rows_per_s(store: ActivationStore, threads: int, repeats: int) -> float:
    best = 0.0
    for r in range(repeats):
        loader = BatchLoader(
            store,
            HOOK,
            batch_size=BATCH,
            heldout_fraction=0.05,
            seed=r,
            epochs=1,
            num_threads=threads,
        )
        t = time.perf_counter()
        n = sum(b.shape[0] for b in loader)
        best = max(best, n / (time.perf_counter() - t))
    return best


def memmap_rows_per_s(x: np.ndarray, root: Path, repeats: int) -> float:
    path = root / "raw.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    best = 0.0
    for r in range(repeats):
        perm = np.random.default_rng(r).permutation(len(mm))
        t = time.perf_counter()
        n = 0
        for i in range(0, len(perm), BATCH):
            n += torch.from_numpy(mm[perm[i : i + BATCH]].astype(np.float32)).shape[0]
        best = max(best, n / (time.perf_counter() - t))
    return best


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so a timer stops when the work is done, not when it is
    queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


COMPILED = "+compiled"  # suffix of a model's name whose step runs compiled (train.compile)
COMPILE_WARMUP = 3  # compile; on CUDA a first run and the CUDA graph's recording, then replays


Stepper = Callable[[], torch.Tensor]


def make_stepper(name: str, cfg: Any, x: torch.Tensor) -> tuple[Stepper, float]:
    """One training step of a fresh model of `cfg` on `x` (returns the step's loss), warmed up, and
    the loss of its first step.  A name ending in `COMPILED` runs its loss as the trainer does with
    `train.compile` (compilation left out: warm-up steps), from the same initial weights as its
    eager twin (seed 0)."""
    device = x.device
    torch.manual_seed(0)
    model = build_model(cfg, D).to(device)
    model.init_b_dec(x)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    dead = torch.zeros(cfg.n_latents, dtype=torch.bool, device=device)
    dead[: cfg.n_latents // 20] = True  # AuxK active, as in real training
    compiled = name.endswith(COMPILED)
    loss_fn = loss_step(wrap_loss(model, DistContext(), device), device, compiled)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        terms, _ = loss_fn(x, dead)
        terms["loss"].backward()
        model.before_optimizer_step()
        opt.step()
        model.after_optimizer_step()
        return terms["loss"].detach()

    first_loss = float(step())  # warm-up (allocations, lazy init, CUDA kernels; compilation)
    for _ in range(COMPILE_WARMUP - 1 if compiled else 0):
        step()
    synchronize(device)
    return step, first_loss


def time_steppers(
    steppers: dict[str, Stepper], steps: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of one step of each stepper; their steps are interleaved so a busy shared
    machine slows all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(steps):
        for name, step in steppers.items():
            synchronize(device)
            t = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def step_seconds(cfgs: dict[str, Any], steps: int, x: torch.Tensor) -> dict[str, float]:
    """Median seconds of one training step per model on `x`'s device, steps interleaved."""
    return time_steppers(
        {name: make_stepper(name, cfg, x)[0] for name, cfg in cfgs.items()}, steps, x.device
    )


def back_to_back_seconds(step: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Seconds per step of `steps` calls queued back to back, one wait for the device at the end."""
    synchronize(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - t) / steps


def trainer_vs_bare(name: str, cfg: Any, x: torch.Tensor, steps: int, repeats: int) -> float:
    """(e): seconds per `Trainer._train_step` over seconds per bare step, both back to back on `x`,
    the schedules at their final values (the bare step's), best of `repeats` alternating rounds."""
    device = x.device
    bare, _ = make_stepper(name, cfg, x)
    with tempfile.TemporaryDirectory() as tmp:
        total = 10_000
        tcfg = TrainConfig(
            batch_size=BATCH,
            tokens=BATCH * total,
            device=device.type,
            log_every=total,
            checkpoint_every=total,
        )
        torch.manual_seed(0)
        trainer = Trainer(
            build_model(cfg, D),
            cfg,
            tcfg,
            tmp,
            CheckpointMeta.start(cfg, D, config_hash="bench"),
            progress=False,
        )
        trainer.model.init_b_dec(x)
        trainer.step = (
            total - 10 * (steps + 1) * repeats
        )  # late in training: k and m at their final values
        dead = torch.zeros(cfg.n_latents, dtype=torch.bool, device=device)
        dead[: cfg.n_latents // 20] = (
            True  # the bare step's AuxK mask (the counts are still kept, not used)
        )
        trainer.dead.dead_mask = lambda: dead

        def train_step() -> None:
            trainer._train_step(x, x.shape[0])
            trainer.step += 1

        train_step()  # warm-up
        best_trainer = best_bare = float("inf")
        for _ in range(repeats):
            best_trainer = min(best_trainer, back_to_back_seconds(train_step, steps, device))
            best_bare = min(best_bare, back_to_back_seconds(bare, steps, device))
        trainer.check_finite()
    return best_trainer / best_bare


def composer_kinds() -> list[str]:
    """Every CompSAE composer kind the config schema allows, `none` (= TopK) left out: a kind
    added to the schema is benchmarked without editing this file."""
    fields = CompSAEConfig.model_fields
    return [k for k in typing.get_args(fields["composer"].annotation) if k != "none"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small store, few steps (< 1 min)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2, help="loader decode threads")
    ap.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the training steps run (auto: CUDA when available)",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time every model's step compiled (train.compile) beside eager, after the eager "
        "results",
    )
    args = ap.parse_args()
    device = resolve_device(args.device)
    rows = args.rows or (32768 if args.quick else 262144)
    steps = args.steps or (3 if args.quick else 10)
    repeats = 2 if args.quick else 3

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store, x = make_store(root, rows)
        mem = memmap_rows_per_s(x, root, repeats)
        load = loader_rows_per_s(store, args.threads, repeats)
        print(f"(a) loader {load:,.0f} rows/s, raw memmap {mem:,.0f} rows/s")

        batch = torch.from_numpy(x[:BATCH].astype(np.float32)).to(device)
        kinds = composer_kinds()
        cfgs = {"topk": make_model_config(type="topk")}
        cfgs.update(
            {kind: make_model_config(type="compsae", composer=kind) for kind in kinds}
        )  # curriculum on
        cfgs["attention_all"] = make_model_config(
            type="compsae", composer="attention", curriculum=False
        )
        t = step_seconds(cfgs, steps, batch)
        topk = t["topk"]
        where = (
            f"on {torch.cuda.get_device_name(device)}"
            if device.type == "cuda"
            else f"on {torch.get_num_threads()} threads"
        )
        print(
            f"(b) step of {BATCH} rows, n_latents 4096, k 32 {where}: TopK {topk * 1e3:.1f} ms, "
            + ", ".join(f"CompSAE {name} {t[name] * 1e3:.1f} ms" for name in t if name != "topk")
            + " (attention: final curriculum m = 4; attention_all: every active latent)"
        )
        default = make_model_config(type="compsae").composer
        train_rows = BATCH / t[default]
        print(
            f"(c) loader {load:,.0f} rows/s vs CompSAE ({default}) training {train_rows:,.0f} "
            "rows/s"
        )

    print(f"RESULT loader_vs_memmap={load / mem:.3f}")
    print(f"RESULT compsae_step_vs_topk={t[default] / topk:.3f}")
    for kind in kinds:
        print(f"RESULT compsae_step_vs_topk_{kind}={t[kind] / topk:.3f}")
    print(f"RESULT loader_vs_train={load / train_rows:.1f}", flush=True)
    for name in ("topk", default):
        ratio = trainer_vs_bare(name, cfgs[name], batch, steps * 3, repeats)
        print(f"(e) {name}: the trainer's step back to back {ratio:.3f}x the bare step's")
        print(f"RESULT trainer_vs_bare_step_{name}={ratio:.3f}", flush=True)
    if args.compile:
        try:
            compiled_steps(cfgs, kinds, steps, batch, where)
        except UserError as e:  # no compiler for this device: the eager results above stand
            print(f"(d) not measured: {e}")


def compiled_steps(
    cfgs: dict[str, Any], kinds: list[str], steps: int, batch: torch.Tensor, where: str
) -> None:
    """(d): each model's step compiled (train.compile) and eager, timed interleaved with TopK's
    compiled and eager steps, one model per round and its RESULT lines printed as soon as they are
    known (a run cut short by a time limit keeps what it measured; the eager (b) lines come
    first)."""
    device = batch.device
    print(
        f"(d) compiled ({compile_mode(device)}) {where}; compilation and warm-up are not timed",
        flush=True,
    )
    t0 = time.perf_counter()
    topk = {name: make_stepper(name, cfgs["topk"], batch) for name in ("topk", "topk" + COMPILED)}
    worst = 0.0
    for name, cfg in cfgs.items():
        if name != "topk":
            t0 = time.perf_counter()
        own = (
            {}
            if name == "topk"
            else {n: make_stepper(n, cfg, batch) for n in (name, name + COMPILED)}
        )
        setup = time.perf_counter() - t0
        runs = topk | own
        t = time_steppers({n: step for n, (step, _) in runs.items()}, steps, device)
        # the same weights and batch: the compiled loss must be the eager one up to float rounding
        eager_loss, compiled_loss = runs[name][1], runs[name + COMPILED][1]
        worst = max(worst, abs(compiled_loss - eager_loss) / max(abs(eager_loss), 1e-12))
        print(
            f"    {name}: compiled {t[name + COMPILED] * 1e3:.1f} ms, eager {t[name] * 1e3:.1f} ms "
            f"(TopK compiled {t['topk' + COMPILED] * 1e3:.1f}, eager {t['topk'] * 1e3:.1f}; "
            f"{setup:.0f} s to compile)"
        )
        if name in kinds:
            ratio = t[name + COMPILED] / t["topk" + COMPILED]
            print(f"RESULT compsae_step_vs_topk_compiled_{name}={ratio:.3f}")
        print(
            f"RESULT step_eager_vs_compiled_{name}={t[name] / t[name + COMPILED]:.3f}", flush=True
        )
    print(f"RESULT compiled_vs_eager_loss_max_rel_diff={worst:.2e}")


if __name__ == "__main__":
    main()
