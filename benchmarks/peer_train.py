"""compsae's trainer against SAELens' and sparsify's, side by side: one TopK SAE, whole processes.

The peers are SAELens' `SAETrainer` and EleutherAI sparsify's `Trainer` (`pip install -e
.[peers]`; sparsify's own requirements beside torch are accelerate, einops, natsort and
schedulefree); this script installs nothing.  A peer that cannot be imported is skipped with a
`SKIP` line and `nan` results.

The same SAE for all three: a TopK SAE of d_model 512, n latents (4,096 and 16,384), k 32, batch
512 rows, Adam (0.9, 0.999) at one learning rate with a linear warm-up over the first 1% of steps
and a linear decay to 0 over the rest (sparsify's Adam schedule, which it does not let one
change), the same initial weights (compsae's draw: unit-norm decoder rows, the encoder their
transpose; `--own-init` lets the peers draw their own at that scale), b_dec from the data's
mean, no activation normalisation, no k anneal, AuxK at 1/32 over the top 256 dead latents with
one dead window in tokens.  What each trainer does its own way stays so: its loss scaling
(sparsify: fraction of variance; the others: squared error per row), SAELens' gradient clipping to
norm 1 (not optional there) and its decoder norm folded into the codes rather than a unit-norm
constraint, sparsify's bf16 autocast and TF32 matmuls on CUDA, each one's dead-latent
bookkeeping.

The same rows for all three: a synthetic store (sparse sums of a random 8,192-direction dictionary,
Zipf-like frequencies, plus noise and an offset; mean norm sqrt(512); float16) written once with
compsae's store API.  compsae's held-out split (5% of sequences, by hash) picks the held-out rows;
the others are the training rows.  compsae trains from the store with `run_train` (its own
loader and shuffle); SAELens and sparsify get the training rows (the store's float16 values as
float32) in memory, in one shared shuffled order, each the way it natively takes data: SAELens an
iterator of activation batches, sparsify a token dataset run through a "model" whose one module
looks the rows up (its trainer hooks a module's output).  Every trainer sees `--tokens` rows.

Each training is a fresh process; rounds alternate compsae, SAELens, sparsify; the best of the
rounds counts (the machine is shared).  Reported: tokens/s of each as a whole process (imports,
data loading and writing the model included) and of its training call alone, and the final
fraction of variance unexplained on the held-out rows, computed by one function here from each
trained model's own reconstruction.

    python benchmarks/peer_train.py --quick          # n 512, 16,384 tokens, one round (< 2 min)
    python benchmarks/peer_train.py                  # n 4,096 and 16,384, 131,072 tokens, 2 rounds
    python benchmarks/peer_train.py --sizes 4096 --device cuda

Ends with RESULT lines for the largest n measured: compsae_train_vs_saelens and
compsae_train_vs_sparsify (whole-process tokens/s, compsae / peer), compsae_fvu, saelens_fvu,
sparsify_fvu; then the same per n with the suffix _n<N>, and the training calls' ratios
(compsae_train_loop_vs_<peer>).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

HOOK = "blocks.3.hook_resid_post"
D = 512
K = 32
BATCH = 512
SEQ = 128  # rows per sequence in the store (the held-out split goes by sequence)
LR = 2e-4
AUX_K = 256  # sparsify fixes it at d_model / 2, SAELens too: the three agree at d 512
AUX_COEF = 1 / 32
HELDOUT_FRACTION = 0.05
TOOLS = ("compsae", "saelens", "sparsify")
PEER_MODULES = {"saelens": "sae_lens", "sparsify": "sparsify"}


# ---------------------------------------------------------------------------------------------
# The rows (written once per work folder)


def synthetic_rows(n_rows: int, seed: int = 0, chunk: int = 65_536) -> np.ndarray:
    """`float16[n_rows, D]`: each row a sum of ~24 directions of a random 8,192-direction
    dictionary (frequencies falling as 1 / rank, magnitudes exponential), plus Gaussian noise and
    one shared offset, scaled to mean norm sqrt(D).  Structure an SAE can find, unlike noise."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n_true, active = 8_192, 24
    dictionary = torch.randn(n_true, D, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    cdf = torch.cumsum(1.0 / (torch.arange(n_true) + 10.0), 0)
    cdf /= cdf[-1].clone()
    offset = torch.randn(D, generator=gen) * 0.5
    out = np.empty((n_rows, D), dtype=np.float32)
    for lo in range(0, n_rows, chunk):
        m = min(chunk, n_rows - lo)
        idx = torch.searchsorted(cdf, torch.rand(m, active, generator=gen)).clamp_max(n_true - 1)
        mags = torch.empty(m, active).exponential_(generator=gen)
        x = torch.nn.functional.embedding_bag(idx, dictionary, per_sample_weights=mags, mode="sum")
        out[lo : lo + m] = (x + offset + 0.05 * torch.randn(m, D, generator=gen)).numpy()
    out *= math.sqrt(D) / np.linalg.norm(out, axis=1).mean()
    return out.astype(np.float16)


def prepare(work: Path, tokens: int) -> dict[str, int]:
    """The store, the training rows and the held-out rows under `work` (kept when there for the
    same token count); returns their row counts."""
    info_path = work / "data.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info["tokens"] == tokens:
            return info
    from compsae.store import ActivationStore, StoreLayout
    from compsae.store.split import HeldOutSplit

    shard = 16_384
    # one epoch of training rows once the ~5% held-out sequences are set aside
    n_rows = -(-int(tokens / (1 - HELDOUT_FRACTION) * 1.02 + 4 * SEQ) // shard) * shard
    x = synthetic_rows(n_rows)
    shutil.rmtree(work / "store.zarr", ignore_errors=True)
    layout = StoreLayout(chunk_rows=1024, shard_rows=shard, dtype="float16")
    store = ActivationStore.create(
        str(work / "store.zarr"), {HOOK: D}, n_rows, layout, {"config_hash": "peer-train"}
    )
    for s in range(store.n_shards):
        lo, hi = store.shard_range(s)
        rows = np.arange(lo, hi)
        store.write_shard(s, {HOOK: x[lo:hi]}, rows % 50_000, rows // SEQ, rows % SEQ)
    store.finalize()
    held = HeldOutSplit(fraction=HELDOUT_FRACTION).mask(np.arange(n_rows) // SEQ)
    np.save(work / "train.npy", x[~held].astype(np.float32))
    np.save(work / "heldout.npy", x[held].astype(np.float32))
    info = {
        "tokens": tokens,
        "rows": n_rows,
        "train": int((~held).sum()),
        "heldout": int(held.sum()),
    }
    info_path.write_text(json.dumps(info))
    return info


def training_order(n_train: int, tokens: int, seed: int = 0) -> np.ndarray:
    """`int64[tokens]`: the training rows the peers read, in order: shuffled, epoch after epoch."""
    rng = np.random.default_rng(seed)
    epochs = -(-tokens // n_train)
    return np.concatenate([rng.permutation(n_train) for _ in range(epochs)])[:tokens]


def shared_init(n: int):  # noqa: ANN201
    """`W_dec: [n, D]` as compsae's trainer starts it (seed 0, unit-norm rows): every trainer starts
    from these weights, the encoder their transpose.  Each tool's own draw differs in direction,
    not scale (SAELens and sparsify: kaiming-uniform rows), and on these rows that alone moves the
    early held-out FVU a lot (`--own-init` keeps the peers' own draw)."""
    import torch

    from compsae.train.config import make_model_config
    from compsae.train.models import build_model

    torch.manual_seed(0)  # as compsae's run_train seeds before it builds the model
    model = build_model(make_model_config(type="topk", n_latents=n, k=K), D)
    return model.W_dec.detach().clone()


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over all rows."""
    x64, err = x.astype(np.float64), (x.astype(np.float64) - x_hat.astype(np.float64))
    return float((err**2).sum() / ((x64 - x64.mean(0)) ** 2).sum())


def schedule(tokens: int) -> tuple[int, int, int]:
    """(steps, warm-up steps, dead window in tokens) of a run of `tokens` rows."""
    steps = tokens // BATCH
    return steps, max(1, steps // 100), max(BATCH, min(1_000_000, tokens // 4))


# ---------------------------------------------------------------------------------------------
# The measured processes: each prints one `CHILD {json}` line


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reconstruct_in_batches(fn, x: np.ndarray, device: str) -> np.ndarray:  # noqa: ANN001
    import torch

    parts = []
    with torch.no_grad():
        for lo in range(0, len(x), 4096):
            batch = torch.from_numpy(x[lo : lo + 4096]).to(device)
            parts.append(fn(batch).float().cpu().numpy())
    return np.concatenate(parts)


def compsae_child(args: argparse.Namespace) -> dict:
    """compsae's train stage (`run_train`) on the store: one TopK model."""
    from compsae.train.config import TrainStageConfig
    from compsae.train.run import run_train
    from compsae.train.trained import TrainedSAE

    work = Path(args.work)
    steps, warm, window = schedule(args.tokens)
    warmup, decay = warm / steps, 1 - warm / steps  # the decay takes every step after the warm-up
    if warmup + decay > 1:  # float rounding: the config refuses a sum over 1
        decay = math.nextafter(decay, 0)
    cfg = TrainStageConfig(
        hook=HOOK,
        models={
            "topk": {
                "type": "topk",
                "n_latents": args.n,
                "k": K,
                "b_dec_init": "mean",
                "graduated_sparsity": False,
                "aux_k": AUX_K,
                "aux_coef": AUX_COEF,
            }
        },
        lr=LR,
        batch_size=BATCH,
        tokens=args.tokens,
        warmup_fraction=warmup,
        decay_fraction=decay,
        normalize=False,
        heldout_fraction=HELDOUT_FRACTION,
        dead_window_tokens=window,
        log_every=steps,
        checkpoint_every=steps,
        device=args.device,
        seed=0,
    )
    out = Path(args.out)
    t0 = time.perf_counter()
    run_train(cfg, str(work / "store.zarr"), str(out), progress=False)
    loop = time.perf_counter() - t0
    sae = TrainedSAE.load(str(out / "topk"), device=args.device)
    held = np.load(work / "heldout.npy")
    x_hat = _reconstruct_in_batches(sae.reconstruct, held, args.device)
    return {"loop_s": loop, "tokens": steps * BATCH, "fvu": fvu(held, x_hat)}


def _without_wandb() -> None:
    """SAELens imports wandb at import time for its logging, which is off here; where wandb is
    not installed an empty module stands in for it."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        import importlib.machinery
        import types

        stub = types.ModuleType("wandb")
        stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        sys.modules["wandb"] = stub


def saelens_child(args: argparse.Namespace) -> dict:
    """SAELens' `SAETrainer` on a TopK training SAE, fed the training rows as an iterator of
    activation batches (its `DataProvider`)."""
    _without_wandb()
    import torch
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    work = Path(args.work)
    steps, warm, window = schedule(args.tokens)
    rows = torch.from_numpy(np.load(work / "train.npy"))
    order = torch.from_numpy(training_order(len(rows), steps * BATCH))

    def batches() -> Iterator[torch.Tensor]:
        for lo in range(0, len(order), BATCH):
            yield rows[order[lo : lo + BATCH]]

    torch.manual_seed(0)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=D,
            d_sae=args.n,
            k=K,
            aux_loss_coefficient=AUX_COEF,
            decoder_init_norm=1.0,  # unit-norm decoder rows, the encoder their transpose
            normalize_activations="none",
            device=args.device,
            dtype="float32",
        )
    )
    with torch.no_grad():  # b_dec from the data's mean, as the others start
        sae.b_dec.copy_(rows[order[:BATCH]].mean(0).to(args.device))
        if not args.own_init:
            w_dec = shared_init(args.n).to(args.device)
            sae.W_dec.copy_(w_dec)
            sae.W_enc.copy_(w_dec.T)
    cfg = SAETrainerConfig(
        total_training_samples=steps * BATCH,
        train_batch_size_samples=BATCH,
        lr=LR,
        lr_end=LR,  # the constant schedule's level, where the decay starts
        lr_warm_up_steps=warm,
        lr_decay_steps=steps - warm,
        adam_beta1=0.9,
        adam_beta2=0.999,
        device=args.device,
        dead_feature_window=max(1, window // BATCH),  # counted in steps
        logger=LoggingConfig(log_to_wandb=False),
    )
    t0 = time.perf_counter()
    trainer = SAETrainer(cfg, sae, batches())
    trainer.fit()
    _synchronize(args.device)
    loop = time.perf_counter() - t0
    sae.eval()
    held = np.load(work / "heldout.npy")
    x_hat = _reconstruct_in_batches(sae, held, args.device)
    return {"loop_s": loop, "tokens": trainer.n_training_samples, "fvu": fvu(held, x_hat)}


def _row_table(table, device: str):  # noqa: ANN001, ANN202
    """The "model" sparsify's trainer runs: token ids are row numbers, its one module `rows` looks
    them up, so the hooked output of `rows` is the stored activations ([batch, seq, D])."""
    import torch
    from torch import nn

    class RowTable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rows = nn.Embedding.from_pretrained(table, freeze=True)

        @property
        def base_model(self) -> nn.Module:  # sparsify finds its hook points under base_model
            return self

        @property
        def device(self) -> torch.device:
            return self.rows.weight.device

        @property
        def dummy_inputs(self) -> dict[str, torch.Tensor]:  # its width probe runs these
            return {"input_ids": torch.zeros(1, 4, dtype=torch.long)}

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.rows(input_ids)

    return RowTable().to(device)


def sparsify_child(args: argparse.Namespace) -> dict:
    """sparsify's `Trainer` (FVU loss, Adam) over a token dataset of row numbers, batch 4
    sequences of 128 rows."""
    import torch
    from datasets import Dataset
    from sparsify import SaeConfig, TrainConfig, Trainer

    work = Path(args.work)
    steps, warm, window = schedule(args.tokens)
    rows = torch.from_numpy(np.load(work / "train.npy"))
    order = training_order(len(rows), steps * BATCH)
    dataset = Dataset.from_dict({"input_ids": order.reshape(-1, SEQ)}).with_format("torch")
    model = _row_table(rows, args.device)
    cfg = TrainConfig(
        SaeConfig(num_latents=args.n, k=K),
        batch_size=BATCH // SEQ,  # sequences
        loss_fn="fvu",
        optimizer="adam",
        lr=LR,
        lr_warmup_steps=warm,
        auxk_alpha=AUX_COEF,
        dead_feature_threshold=window,
        hookpoints=["rows"],
        save_every=10 * steps,
        save_dir=str(Path(args.out)),
        log_to_wandb=False,
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg, dataset, model)
    sae = trainer.saes["rows"]
    with torch.no_grad():  # the encoder as the unit-norm decoder's transpose, as the others start
        if not args.own_init:
            sae.W_dec.copy_(shared_init(args.n).to(args.device))
        sae.encoder.weight.copy_(sae.W_dec)
    trainer.fit()
    _synchronize(args.device)
    loop = time.perf_counter() - t0
    held = np.load(work / "heldout.npy")
    x_hat = _reconstruct_in_batches(lambda b: sae(b).sae_out, held, args.device)
    return {"loop_s": loop, "tokens": trainer.global_step * BATCH, "fvu": fvu(held, x_hat)}


CHILDREN = {"compsae": compsae_child, "saelens": saelens_child, "sparsify": sparsify_child}


# ---------------------------------------------------------------------------------------------
# The parent


def child_env() -> dict[str, str]:
    """Environment of every measured process: offline, no progress bars, this checkout first."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TQDM_DISABLE="1",
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return env


def run_child(tool: str, n: int, work: Path, args: argparse.Namespace) -> dict:
    """One training in a fresh process: its JSON result plus the whole process's seconds, or
    `{"ok": False, "error": last line}`."""
    out = work / "runs" / tool
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        tool,
        "--work",
        str(work),
        "--out",
        str(out),
        "--n",
        str(n),
        "--tokens",
        str(args.tokens),
        "--device",
        args.device,
        *(["--own-init"] if args.own_init else []),
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=child_env(), capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"ran past --timeout {args.timeout:.0f} s"}
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")]
    if proc.returncode != 0 or not lines:
        text = (proc.stdout + proc.stderr).strip()
        return {"ok": False, "error": text.splitlines()[-1] if text else f"exit {proc.returncode}"}
    return {"ok": True, "wall_s": wall, **json.loads(lines[-1][len("CHILD ") :])}


def unavailable(device: str) -> dict[str, str]:
    """tool -> why it cannot run here (only those that cannot)."""
    why: dict[str, str] = {}
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return {t: "no CUDA device here (torch.cuda.is_available() is False)" for t in TOOLS}
    for tool, module in PEER_MODULES.items():
        if importlib.util.find_spec(module) is None:
            why[tool] = f"{module} is not installed (pip install -e '.[peers]')"
    return why


def report(
    runs: dict[int, dict[str, list[dict]]], skipped: dict[str, str], sizes: list[int]
) -> None:
    """The RESULT lines: unsuffixed for the largest n, then per n."""
    for tool, why in skipped.items():
        print(f"SKIP {tool}: {why}")

    def best(results: list[dict], key: str) -> float:
        rates = [r["tokens"] / r[key] for r in results if r["ok"]]
        return max(rates) if rates else math.nan

    def last_fvu(results: list[dict]) -> float:
        ok = [r["fvu"] for r in results if r["ok"]]
        return ok[-1] if ok else math.nan

    lines: list[tuple[str, float]] = []
    for i, n in enumerate(sorted(sizes, reverse=True)):
        tools = runs.get(n, {t: [] for t in TOOLS})
        suffixes = ["", f"_n{n}"] if i == 0 else [f"_n{n}"]
        for suffix in suffixes:
            for peer in ("saelens", "sparsify"):
                whole = best(tools["compsae"], "wall_s") / best(tools[peer], "wall_s")
                lines.append((f"compsae_train_vs_{peer}{suffix}", whole))
            for tool in TOOLS:
                lines.append((f"{tool}_fvu{suffix}", last_fvu(tools[tool])))
            if suffix:
                for peer in ("saelens", "sparsify"):
                    loop = best(tools["compsae"], "loop_s") / best(tools[peer], "loop_s")
                    lines.append((f"compsae_train_loop_vs_{peer}{suffix}", loop))
    for name, value in lines:
        print(f"RESULT {name}={value:.4f}" if not math.isnan(value) else f"RESULT {name}=nan")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="n 512, 16,384 tokens, one round")
    ap.add_argument("--sizes", help="comma-separated n latents (default 4096,16384; --quick 512)")
    ap.add_argument("--tokens", type=int, help="rows each trainer trains on (default 131,072)")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 2; --quick 1)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--work", help="folder for the rows (default: a temporary one)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each process")
    ap.add_argument(
        "--own-init",
        action="store_true",
        help="SAELens and sparsify draw their own initial weights (same scale, other directions) "
        "instead of compsae's",
    )
    ap.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.tokens = args.tokens or (16_384 if args.quick else 131_072)
    if args.child:
        print("CHILD " + json.dumps(CHILDREN[args.child](args)), flush=True)
        return
    if args.tokens < 2 * BATCH or args.tokens % (BATCH) or BATCH % SEQ:
        sys.exit(f"--tokens must be a multiple of {BATCH} and at least {2 * BATCH}")
    try:
        sizes = [int(s) for s in (args.sizes or ("512" if args.quick else "4096,16384")).split(",")]
    except ValueError:
        sys.exit(f"--sizes takes comma-separated integers, got {args.sizes!r}")
    if any(n < K for n in sizes):
        sys.exit(f"--sizes: every n must be at least k = {K}")
    rounds = args.rounds or (1 if args.quick else 2)
    skipped = unavailable(args.device)
    runs: dict[int, dict[str, list[dict]]] = {}
    if len(skipped) < len(TOOLS):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work or tmp)
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            info = prepare(work, args.tokens)
            print(
                f"rows ready in {time.perf_counter() - t0:.1f} s: {info['train']:,} training, "
                f"{info['heldout']:,} held out; {args.tokens:,} tokens per training, batch "
                f"{BATCH}, k {K}, lr {LR:g}, device {args.device}, {os.cpu_count()} cpus, load "
                f"{os.getloadavg()[0]:.1f}",
                flush=True,
            )
            for n in sizes:
                runs[n] = {t: [] for t in TOOLS}
                for r in range(rounds):
                    for tool in TOOLS:
                        if tool in skipped:
                            continue
                        res = run_child(tool, n, work, args)
                        runs[n][tool].append(res)
                        if res["ok"]:
                            print(
                                f"n {n:>6} round {r} {tool:<8} {res['tokens']:>9,} tokens  "
                                f"whole process {res['wall_s']:7.1f} s "
                                f"({res['tokens'] / res['wall_s']:7,.0f} tokens/s)  training "
                                f"{res['loop_s']:7.1f} s "
                                f"({res['tokens'] / res['loop_s']:7,.0f} tokens/s)  "
                                f"held-out FVU {res['fvu']:.4f}  load {os.getloadavg()[0]:.1f}",
                                flush=True,
                            )
                        else:
                            print(f"n {n} round {r} {tool}: FAILED: {res['error']}", flush=True)
    for tool in TOOLS:
        if (
            tool not in skipped
            and runs
            and all(not any(r["ok"] for r in per[tool]) for per in runs.values())
        ):
            skipped[tool] = "every run failed (see FAILED above)"
    report(runs, skipped, sizes)


if __name__ == "__main__":
    main()
