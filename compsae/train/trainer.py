"""The training loop: Adam with warm-up and decay over a token budget, graduated sparsity, the
composition curriculum, dead-latent tracking, metrics.jsonl, atomic checkpoints and exact resume.

The trainer sees an iterator of activation batches `[batch, d]` and nothing of stores; the caller
passes a callable giving the iterator's position, which goes into every checkpoint.

Under `torchrun` every rank gets the same *global* batches and trains on its slice of each (see
`distributed.py`); loss terms, fired latents and metrics are all-reduced so that every rank takes
the same decisions, and only rank 0 writes checkpoints and metrics."""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm

from compsae import durable
from compsae.errors import UserError
from compsae.files import TRAIN_METRICS
from compsae.train.checkpoint import (
    load_optimizer_tensors,
    load_resume_state,
    optimizer_tensors,
    read_meta,
    save_checkpoint,
)
from compsae.train.compiled import loss_step
from compsae.train.config import ModelConfig, TrainConfig
from compsae.train.dead_latents import DeadLatentTracker
from compsae.train.device_values import FirstNonFinite, StepTerms
from compsae.train.distributed import DistContext, wrap_loss
from compsae.train.models import SAEOutput, SparseAutoencoder
from compsae.train.records import CheckpointMeta
from compsae.train.schedules import (
    k_at,
    l1_scale_at,
    lr_at,
    m_at,
    pair_group_scale_at,
    pair_on_at,
    pair_scale_at,
)

METRICS_FILE = TRAIN_METRICS


def resolve_device(device: str) -> torch.device:
    """ "auto" -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "train.device is cuda but no CUDA device is visible; set train.device=auto or cpu"
        )
    return torch.device(device)


@torch.no_grad()
def metric_sums(x: torch.Tensor, out: SAEOutput) -> torch.Tensor:
    """What the batch metrics need from rows `x: [b, d]` and their reconstruction, as sums that add
    up over ranks: `[Σ‖x − x̂‖², Σ L0, Σ‖x − x̂_linear‖², Σ gate]` (the last two 0 without
    composition)."""
    x = x.float()
    x_hat = out.x_hat.float()
    sq_err = (x - x_hat).pow(2).sum()
    l0 = (out.z != 0).sum().float()
    if out.comp is not None:
        sq_err_linear = (x - (x_hat - out.comp.float())).pow(2).sum()
        gate = out.gate.float().sum() if out.gate is not None else x.new_tensor(float(x.numel()))
    else:
        sq_err_linear = gate = x.new_zeros(())
    return torch.stack([sq_err, l0, sq_err_linear, gate])


@torch.no_grad()
def metrics_from_sums(
    sums: torch.Tensor, x: torch.Tensor, scale: float, composition: bool
) -> dict[str, float]:
    """Reconstruction metrics of the batch `x: [b, d]` in the data's original units (normalisation
    undone) from `metric_sums` over all its rows.

    FVU = Σ‖x − x̂‖² / Σ‖x − μ‖² with μ the batch mean (scale-free); with composition also the FVU
    with the composition path switched off and the mean gate value."""
    x = x.float()
    total_var = float((x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
    return metrics_from_totals(sums, total_var, x.shape[0], x.shape[1], scale, composition)


def metrics_from_totals(
    sums: torch.Tensor, total_var: float, n: int, d: int, scale: float, composition: bool
) -> dict[str, float]:
    """`metrics_from_sums` of a batch of `n` rows of width `d` known by its total variance
    Σ‖x − μ‖² only (a batch spread over data-parallel ranks)."""
    sq_err, l0, sq_err_linear, gate = (float(v) for v in sums)
    metrics = {"mse": sq_err / (n * d) / scale**2, "fvu": sq_err / total_var, "l0": l0 / n}
    if composition:
        metrics["fvu_no_comp"] = sq_err_linear / total_var
        metrics["gate_mean"] = gate / (n * d)
    return metrics


@torch.no_grad()
def batch_metrics(x: torch.Tensor, out: SAEOutput, scale: float) -> dict[str, float]:
    """Reconstruction metrics (MSE in original units, FVU, L0; for CompSAE also FVU without the
    composition path and the mean gate) of one batch `x` and its forward output `out`."""
    return metrics_from_sums(metric_sums(x, out), x, scale, out.has_composition)


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl line, or None for a line cut short by a kill."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return int(record.get("step", 0)) if isinstance(record, dict) else None


class MetricsLog:
    """metrics.jsonl: appended line by line locally; rewritten whole on object stores.  A disabled
    log (ranks other than 0) keeps the lines in memory and writes nothing."""

    def __init__(self, folder: str, enabled: bool = True) -> None:
        self.fs, base = fsspec.core.url_to_fs(folder)
        self.path = f"{base}/{METRICS_FILE}"
        self.local = isinstance(self.fs, LocalFileSystem)
        self.enabled = enabled
        self.lines: list[str] = []

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run logs them again) and any line a kill cut
        short."""
        kept: list[str] = []
        if self.fs.exists(self.path):
            for ln in self.fs.cat_file(self.path).decode(errors="replace").splitlines():
                line_step = _step_of(ln) if ln.strip() else None
                if line_step is not None and line_step <= step:
                    kept.append(ln)
        self.lines = [ln + "\n" for ln in kept]
        self.flush(force=True)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        self.lines.append(line)
        if self.local and self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)

    def flush(self, force: bool = False) -> None:
        if not self.enabled or not (force or not self.local):
            return
        data = "".join(self.lines).encode()
        durable.atomic_write(
            self.path, data, fs=self.fs
        )  # a kill mid-rewrite must not lose the kept lines


class Trainer:
    """Trains one model into `out_dir` (checkpoint files + metrics.jsonl).

    `meta` holds the checkpoint's fixed fields (model config, hook, normalization, config_hash,
    d_in, store_manifest_hash; `CheckpointMeta.start(model_cfg, d_in, ...)`); the trainer fills in
    step, tokens_seen and finished at every checkpoint; `scale` is the loader's normalisation
    factor, undone in the metrics. `dist` places this process in a data-parallel job (default:
    alone); `tracker` (rank 0) receives every metrics record too (experiment tracking,
    `tracking.py`)."""

    def __init__(
        self,
        model: SparseAutoencoder,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        out_dir: str,
        meta: CheckpointMeta,
        scale: float = 1.0,
        name: str = "",
        progress: bool = True,
        dist: DistContext | None = None,
        tracker: Any = None,
    ) -> None:
        self.dist = dist or DistContext()
        self.tracker = (
            tracker if self.dist.is_main else None
        )  # e.g. a WandbTracker: gets every metrics record
        self.device = self.dist.device(resolve_device(cfg.device))
        self.model = model.to(self.device)
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.out_dir = out_dir.rstrip("/")
        self.meta = meta
        self.scale = scale
        self.name = name or model_cfg.type
        self.progress = progress and self.dist.is_main
        self.total = cfg.total_steps
        self.step = 0
        self.tokens_seen = 0
        self.last_saved_step: int | None = None
        self.loader_state: Callable[[], dict[str, Any]] | None = None
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        self.dead = DeadLatentTracker(model_cfg.n_latents, cfg.dead_window_tokens, self.device)
        self.first_bad = FirstNonFinite(self.device)
        self.metrics = MetricsLog(self.out_dir, enabled=self.dist.is_main)
        if self.dist.is_main:
            fs, path = fsspec.core.url_to_fs(self.out_dir)
            fs.makedirs(path, exist_ok=True)
        # compute_loss through DistributedDataParallel when there are several ranks
        self.loss_module = wrap_loss(self.model, self.dist, self.device)
        # train.compile: the same loss, compiled (the model is not wrapped: checkpoint keys
        # unchanged)
        self.loss_step = loss_step(
            self.loss_module, self.device, cfg.compile, data_parallel=self.dist.enabled
        )
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if cfg.bf16 and self.device.type == "cuda"
            else nullcontext()
        )

    # -- resume
    # -------------------------------------------------------------------------------------

    def resume(self) -> dict[str, Any] | None:
        """Load the resume state in `out_dir` when there is one; return the saved loader state (or
        None when starting fresh).  A checkpoint of another config is refused."""
        saved = load_resume_state(self.out_dir)
        if saved is None:
            if read_meta(self.out_dir) is not None:
                raise UserError(
                    f"{self.out_dir} has a checkpoint without its resume state; pass --force to "
                    "start over"
                )
            self.metrics.truncate_after(0)
            return None
        if saved.meta.get("config_hash") != self.meta.config_hash:
            raise UserError(
                f"{self.out_dir} holds a checkpoint of another config "
                f"({saved.meta.get('config_hash')} != "
                f"{self.meta.config_hash}); pass --force to start over or choose another "
                "folder"
            )
        self.model.load_state_dict({k: v.to(self.device) for k, v in saved.weights.items()})
        load_optimizer_tensors(self.opt, self.param_names, saved.tensors)
        self.dead.load_state_dict({"since_fired": saved.tensors["dead.since_fired"]})
        torch.set_rng_state(saved.tensors["rng.torch"])
        self.step = saved.step
        self.tokens_seen = int(saved.state["tokens_seen"])
        self.last_saved_step = self.step
        self.metrics.truncate_after(self.step)
        return saved.state.get("loader")

    @property
    def finished(self) -> bool:
        return self.step >= self.total

    # -- the loop
    # -----------------------------------------------------------------------------------

    def fit(
        self,
        batches: Iterator[torch.Tensor],
        loader_state: Callable[[], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Train until the token budget is spent (or `batches` runs out); return the last metrics.

        `batches` yields this rank's share of each global batch (the whole batch for one process; in
        a data-parallel job the `local_rows` share, as `BatchLoader(part=(rank, world))` reads
        it)."""
        self.loader_state = loader_state
        last: dict[str, Any] = {}
        bar = tqdm(
            total=self.total,
            initial=self.step,
            desc=f"train {self.name}",
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
        )
        window_start, window_tokens = time.perf_counter(), 0
        try:
            while self.step < self.total:
                try:
                    x = next(batches)
                except StopIteration:
                    break
                x = x.to(
                    self.device, non_blocking=True
                )  # [rows, d]: this rank's share of the global batch
                n = self._global_rows(x)
                if self.step == 0:
                    # from the global batch: the same on every rank
                    self.model.init_b_dec(self.dist.gather_rows(x))
                terms, out = self._train_step(x, n)
                self.step += 1
                self.tokens_seen += n
                window_tokens += n
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.total:
                    self.check_finite()
                    now = time.perf_counter()
                    last = self._log(
                        x, n, terms.floats(), out, window_tokens / max(now - window_start, 1e-9)
                    )
                    bar.set_postfix(
                        {k: f"{last[k]:.3g}" for k in ("loss", "fvu", "l0", "dead_fraction")}
                        | {"k": last["k"], "m": last["m"]}
                    )
                    window_start, window_tokens = now, 0
                if self.step % self.cfg.checkpoint_every == 0 and self.step < self.total:
                    self.save(finished=False)
        finally:
            bar.close()
        self.model.reset_schedule()
        self.save(finished=self.finished)
        return last

    def check_finite(self) -> None:
        """Raise when a step since the last check had a non-finite loss (before anything is logged
        or saved from it: the last checkpoint written stays the last good one)."""
        bad = self.first_bad.read()
        if bad is not None:
            step, loss = bad
            kept = (
                f"the last good checkpoint (step {self.last_saved_step}) is kept in {self.out_dir}"
                if self.last_saved_step is not None
                else "no checkpoint was written yet"
            )
            raise UserError(
                f"{self.name}: loss is {loss} at step {step}; {kept}; "
                "lower train.lr or check the activations for inf/NaN"
            )

    def _global_rows(self, x: torch.Tensor) -> int:
        """Rows of the global batch whose share `x` is (one all-reduce in a data-parallel job)."""
        if not self.dist.enabled:
            return x.shape[0]
        return int(
            self.dist.all_reduce_sum(
                torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
            ).item()
        )

    def _train_step(self, x: torch.Tensor, n: int) -> tuple[StepTerms, SAEOutput]:
        """One optimizer step on the global batch of `n` rows whose share on this rank is `x`;
        returns the global loss terms (batch means, still on the device) and this rank's forward
        output.  Nothing here reads a value back to the host: on a GPU the host queues the next
        steps while this one runs; a non-finite loss is noted on the device and raised by
        `check_finite` at the next log step or checkpoint.

        A rank left without rows (n < world size) trains on one zero row with weight 0: it must
        still take part in the gradient all-reduce."""
        step, total = self.step, self.total
        share = x.shape[0] / n
        x_local = x if x.shape[0] else x.new_zeros((1, x.shape[1]))
        self.model.train()
        schedule: dict[str, Any] = {
            "k": k_at(step, total, self.model_cfg),
            "m": m_at(step, total, self.model_cfg),
            "l1_scale": l1_scale_at(step, total, self.model_cfg),
        }
        if self.model_cfg.type == "compsae":
            schedule["pair_scale"] = pair_scale_at(step, total, self.model_cfg)
            schedule["pair_on"] = pair_on_at(step, total, self.model_cfg)
            schedule["group_scale"] = pair_group_scale_at(step, total, self.model_cfg)
        self.model.set_schedule(**schedule)
        lr = lr_at(step, total, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with self.autocast:
            terms, out = self.loss_step(x_local, self.dead.dead_mask())
        names = sorted(terms)
        fired = (
            (out.z != 0).any(0)
            if share
            else torch.zeros(out.z.shape[1], dtype=torch.bool, device=out.z.device)
        )
        # One all-reduce: every term is a batch mean, so the share-weighted sum is the global mean;
        # the fired counts tell every rank which latents fired anywhere in the global batch.
        packed = torch.cat(
            [torch.stack([terms[k].detach().float() for k in names]) * share, fired.float()]
        )
        self.dist.all_reduce_sum(packed)
        self.first_bad.note(packed[names.index("loss")], step + 1)  # the same on every rank
        loss = terms["loss"]
        if self.dist.enabled:
            # DDP averages gradients over ranks; weighting by share·world makes that average the
            # gradient of the global batch mean, also for uneven slices.
            loss = loss * (share * self.dist.world_size)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.model.before_optimizer_step()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.model.after_optimizer_step()
        if self.dist.enabled:
            self.dead.reset_fired(packed[len(names) :] > 0, n)
        else:
            self.dead.update(out.z)
        return StepTerms(names, packed[: len(names)]), out

    def _log(
        self, x: torch.Tensor, n: int, terms: dict[str, float], out: SAEOutput, tokens_per_s: float
    ) -> dict[str, Any]:
        """Log the metrics of the step just taken: `x` this rank's share of the global batch of `n`
        rows."""
        if not self.dist.enabled:
            metrics = metrics_from_sums(metric_sums(x, out), x, self.scale, out.has_composition)
        else:
            # the global batch's variance from sums over ranks: Σ‖x − μ‖² = Σ‖x‖² − ‖Σx‖² / n
            x64 = x.double()
            local = torch.cat(
                [
                    metric_sums(x, out).double() if x.shape[0] else x64.new_zeros(4),
                    x64.sum(0),
                    x64.pow(2).sum()[None],
                ]
            )
            self.dist.all_reduce_sum(local)
            total_var = max(float(local[-1] - local[4:-1].pow(2).sum() / n), 1e-12)
            metrics = metrics_from_totals(
                local[:4], total_var, n, x.shape[1], self.scale, out.has_composition
            )
        record: dict[str, Any] = {"step": self.step, "tokens": self.tokens_seen}
        record.update(terms)
        record.update(metrics)
        record.update(
            {
                "k": getattr(self.model, "k", None) if self.model_cfg.type != "relu" else None,
                "m": getattr(self.model, "m", None),
                "dead_fraction": self.dead.dead_fraction(),
                "lr": self.opt.param_groups[0]["lr"],
                "tokens_per_s": tokens_per_s,
            }
        )
        self.metrics.append(record)
        if self.tracker is not None:
            self.tracker.log(record)
        return record

    # -- checkpoints
    # --------------------------------------------------------------------------------

    def save(self, finished: bool) -> None:
        """Write the checkpoint of the current step (rank 0; the others wait for its verdict).

        A write that fails (disk full) leaves the previous checkpoint valid and stops training on
        every rank with one line; so does a non-finite loss since the last check (nothing is
        saved)."""
        self.check_finite()
        error = None
        if self.dist.is_main:
            try:
                self._write_checkpoint(finished)
            except OSError as e:
                what = (
                    "disk full"
                    if e.errno in (errno.ENOSPC, errno.EDQUOT)
                    else f"{e.strerror or type(e).__name__}"
                )
                error = (
                    f"{self.name}: {what} while writing the checkpoint of step {self.step} in "
                    f"{self.out_dir}; "
                    "the previous checkpoint stays valid: free space and rerun the same command to "
                    "resume"
                )
        error = self.dist.broadcast(error)
        if error is not None:
            raise UserError(error)
        self.last_saved_step = self.step

    def _write_checkpoint(self, finished: bool) -> None:
        tensors = optimizer_tensors(self.opt, self.param_names)
        tensors["dead.since_fired"] = self.dead.state_dict()["since_fired"]
        tensors["rng.torch"] = torch.get_rng_state()
        state = {
            "tokens_seen": self.tokens_seen,
            "loader": self.loader_state() if self.loader_state else None,
        }
        meta = self.meta.model_copy(
            update={
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "finished": finished,
                "type": self.model_cfg.type,
                "model": self.model_cfg,
            }
        ).model_dump(mode="json")
        self.metrics.flush()
        save_checkpoint(self.out_dir, self.model, meta, tensors, state)
