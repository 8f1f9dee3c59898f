"""The training loop: Adam with warm-up and decay over a token budget, graduated sparsity, the
composition curriculum, dead-latent tracking, metrics.jsonl, atomic checkpoints and exact resume.

The trainer sees an iterator of activation batches `[batch, d]` and nothing of stores; the caller
passes a callable giving the iterator's position, which goes into every checkpoint."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm

from compsae.errors import UserError
from compsae.train.checkpoint import (
    load_optimizer_tensors,
    load_train_state,
    load_weights,
    optimizer_tensors,
    read_meta,
    save_checkpoint,
)
from compsae.train.config import ModelConfig, TrainConfig
from compsae.train.dead_latents import DeadLatentTracker
from compsae.train.models import SAEOutput, SparseAutoencoder
from compsae.train.schedules import k_at, l1_scale_at, lr_at, m_at

METRICS_FILE = "metrics.jsonl"


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is visible; set train.device=auto or cpu")
    return torch.device(device)


@torch.no_grad()
def batch_metrics(x: torch.Tensor, out: SAEOutput, scale: float) -> dict[str, float]:
    """Reconstruction metrics of one batch in the data's original units (normalisation undone).

    FVU = Σ‖x − x̂‖² / Σ‖x − μ‖² with μ the batch mean (scale-free); for CompSAE also the FVU with
    the composition path switched off and the mean gate value."""
    x = x.float()
    x_hat = out.x_hat.float()
    total_var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    sq_err = (x - x_hat).pow(2).sum()
    metrics = {
        "mse": float(sq_err / x.numel()) / scale**2,
        "fvu": float(sq_err / total_var),
        "l0": float((out.z != 0).sum(-1).float().mean()),
    }
    if "comp" in out.extras:
        linear = x_hat - out.extras["comp"].float()
        metrics["fvu_no_comp"] = float((x - linear).pow(2).sum() / total_var)
        metrics["gate_mean"] = float(out.extras["gate"].float().mean())
    return metrics


class MetricsLog:
    """metrics.jsonl: appended line by line locally; rewritten whole on object stores."""

    def __init__(self, folder: str) -> None:
        self.fs, base = fsspec.core.url_to_fs(folder)
        self.path = f"{base}/{METRICS_FILE}"
        self.local = isinstance(self.fs, LocalFileSystem)
        self.lines: list[str] = []

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run logs them again)."""
        if self.fs.exists(self.path):
            kept = [ln for ln in self.fs.cat_file(self.path).decode().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= step]
        else:
            kept = []
        self.lines = [ln + "\n" for ln in kept]
        self.flush(force=True)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        self.lines.append(line)
        if self.local:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)

    def flush(self, force: bool = False) -> None:
        if force or not self.local:
            self.fs.pipe_file(self.path, "".join(self.lines).encode())


class Trainer:
    """Trains one model into `out_dir` (checkpoint files + metrics.jsonl).

    `meta` holds the checkpoint's fixed fields (model config, hook, normalization, config_hash, d_in,
    store_manifest_hash); `scale` is the loader's normalisation factor, undone in the metrics."""

    def __init__(self, model: SparseAutoencoder, model_cfg: ModelConfig, cfg: TrainConfig, out_dir: str,
                 meta: dict[str, Any], scale: float = 1.0, name: str = "", progress: bool = True) -> None:
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.out_dir = out_dir.rstrip("/")
        self.meta = meta
        self.scale = scale
        self.name = name or model_cfg.type
        self.progress = progress
        self.total = cfg.total_steps
        self.step = 0
        self.tokens_seen = 0
        self.last_saved_step: int | None = None
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        self.dead = DeadLatentTracker(model_cfg.n_latents, cfg.dead_window_tokens, self.device)
        self.metrics = MetricsLog(self.out_dir)
        fs, path = fsspec.core.url_to_fs(self.out_dir)
        fs.makedirs(path, exist_ok=True)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if cfg.bf16 and self.device.type == "cuda" else nullcontext())

    # -- resume -------------------------------------------------------------------------------------

    def resume(self) -> dict[str, Any] | None:
        """Load the checkpoint in `out_dir` when there is one; return the saved loader state (or None
        when starting fresh).  A checkpoint of another config is refused."""
        meta = read_meta(self.out_dir)
        if meta is None:
            self.metrics.truncate_after(0)
            return None
        if meta.get("config_hash") != self.meta.get("config_hash"):
            raise UserError(
                f"{self.out_dir} holds a checkpoint of another config ({meta.get('config_hash')} != "
                f"{self.meta.get('config_hash')}); pass --force to start over or choose another folder")
        loaded = load_train_state(self.out_dir)
        if loaded is None:
            raise UserError(f"{self.out_dir} has a checkpoint without its resume state; pass --force to start over")
        tensors, state = loaded
        weights = load_weights(self.out_dir)
        self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        load_optimizer_tensors(self.opt, self.param_names, tensors)
        self.dead.load_state_dict({"since_fired": tensors["dead.since_fired"]})
        torch.set_rng_state(tensors["rng.torch"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.last_saved_step = self.step
        self.metrics.truncate_after(self.step)
        return state.get("loader")

    @property
    def finished(self) -> bool:
        return self.step >= self.total

    # -- the loop -----------------------------------------------------------------------------------

    def fit(self, batches: Iterator[torch.Tensor], loader_state: Callable[[], dict[str, Any]] | None = None
            ) -> dict[str, Any]:
        """Train until the token budget is spent (or `batches` runs out); return the last metrics."""
        self.loader_state = loader_state
        last: dict[str, Any] = {}
        bar = tqdm(total=self.total, initial=self.step, desc=f"train {self.name}", disable=not self.progress,
                   unit="step", dynamic_ncols=True)
        window_start, window_tokens = time.perf_counter(), 0
        try:
            while self.step < self.total:
                try:
                    x = next(batches)
                except StopIteration:
                    break
                x = x.to(self.device, non_blocking=True)
                if self.step == 0:
                    self.model.init_b_dec(x)
                terms, out = self._train_step(x)
                self.step += 1
                self.tokens_seen += x.shape[0]
                window_tokens += x.shape[0]
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.total:
                    now = time.perf_counter()
                    last = self._log(x, terms, out, window_tokens / max(now - window_start, 1e-9))
                    bar.set_postfix({k: f"{last[k]:.3g}" for k in ("loss", "fvu", "l0", "dead_fraction")}
                                    | {"k": last["k"], "m": last["m"]})
                    window_start, window_tokens = now, 0
                if self.step % self.cfg.checkpoint_every == 0 and self.step < self.total:
                    self.save(finished=False)
        finally:
            bar.close()
        self.model.reset_schedule()
        self.save(finished=self.finished)
        return last

    def _train_step(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], SAEOutput]:
        step, total = self.step, self.total
        self.model.train()
        self.model.set_schedule(k=k_at(step, total, self.model_cfg), m=m_at(step, total, self.model_cfg),
                                l1_scale=l1_scale_at(step, total, self.model_cfg))
        lr = lr_at(step, total, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with self.autocast:
            terms, out = self.model.compute_loss(x, dead_mask=self.dead.dead_mask())
        loss = terms["loss"]
        if not torch.isfinite(loss):
            kept = (f"the last good checkpoint (step {self.last_saved_step}) is kept in {self.out_dir}"
                    if self.last_saved_step is not None else "no checkpoint was written yet")
            raise UserError(f"{self.name}: loss is {float(loss.detach())} at step {step + 1}; {kept}; "
                            "lower train.lr or check the activations for inf/NaN")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.model.before_optimizer_step()
        self.opt.step()
        self.model.after_optimizer_step()
        self.dead.update(out.z)
        return terms, out

    def _log(self, x: torch.Tensor, terms: dict[str, torch.Tensor], out: SAEOutput, tokens_per_s: float
             ) -> dict[str, Any]:
        record: dict[str, Any] = {"step": self.step, "tokens": self.tokens_seen}
        record.update({k: float(v.detach()) for k, v in terms.items()})
        record.update(batch_metrics(x, out, self.scale))
        record.update({
            "k": getattr(self.model, "k", None) if self.model_cfg.type != "relu" else None,
            "m": getattr(self.model, "m", None),
            "dead_fraction": self.dead.dead_fraction(),
            "lr": self.opt.param_groups[0]["lr"],
            "tokens_per_s": tokens_per_s,
        })
        self.metrics.append(record)
        return record

    # -- checkpoints --------------------------------------------------------------------------------

    def save(self, finished: bool) -> None:
        """Write the checkpoint (resume state first, config.json last) for the current step."""
        tensors = optimizer_tensors(self.opt, self.param_names)
        tensors["dead.since_fired"] = self.dead.state_dict()["since_fired"]
        tensors["rng.torch"] = torch.get_rng_state()
        state = {"tokens_seen": self.tokens_seen, "loader": self.loader_state() if self.loader_state else None}
        meta = {**self.meta, "step": self.step, "tokens_seen": self.tokens_seen, "finished": finished,
                "type": self.model_cfg.type, "model": self.model_cfg.model_dump(mode="json")}
        self.metrics.flush()
        save_checkpoint(self.out_dir, self.model, meta, tensors, state)
        self.last_saved_step = self.step

