"""The train stage: every model of `TrainStageConfig.models` trained on one store, each into
`<out_dir>/<name>/`, resuming where a previous run of the same config stopped.

Launched by `torchrun --nproc-per-node N`, the same call trains data-parallel (see
`distributed.py`): rank 0 holds the folder lock and writes, and every rank returns rank 0's
outputs."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import fsspec
import torch

from compsae import durable
from compsae.errors import UserError
from compsae.files import STAGE_LOCK
from compsae.resources import check_memory
from compsae.stages import join
from compsae.store import ActivationStore, manifest_digest
from compsae.store.loader import BatchLoader
from compsae.store.split import HeldOutSplit
from compsae.threads import torch_threads
from compsae.train.checkpoint import (
    MODEL_FILE,
    read_meta,
    read_resume_meta,
    remove_checkpoint,
)
from compsae.train.config import ImportedSAE, ModelConfig, TrainConfig, TrainStageConfig
from compsae.train.distributed import DistContext, init_from_env
from compsae.train.models import build_model
from compsae.train.records import CheckpointMeta, Normalization, TrainedModelRecord, TrainOutputs
from compsae.train.reuse import ModelPlan, copy_model_folder, plan_model, training_hash
from compsae.train.trained import TrainedSAE
from compsae.train.trainer import Trainer, batch_metrics, resolve_device
from compsae.variance import FVUAccumulator

HELDOUT_EVAL_BATCHES = 20


def open_training_store(url: str, hook: str) -> ActivationStore:
    """Open a complete store that holds `hook`, or explain in one line why it cannot be used."""
    store = ActivationStore.open(url)
    if not store.complete:
        raise UserError(
            f"the store at {url} is not complete (harvest interrupted?); rerun `compsae harvest`"
        )
    if hook not in store.hooks:
        raise UserError(
            f"the store at {url} holds {', '.join(store.hooks)}, not {hook!r}; "
            "set train.hook to a harvested hook or harvest that hook"
        )
    return store


@contextmanager
def training_lock(out_dir: str, ctx: DistContext | None = None) -> Iterator[None]:
    """Refuse a second training into `out_dir` while one is running: the stage folder's one lock
    (`durable.exclusive_lock`; the OS drops it when the holder dies).  The train stage takes it here
    rather than in the pipeline because in a data-parallel job rank 0 takes it and every rank must
    get the same verdict."""
    ctx = ctx or DistContext()
    with ExitStack() as held:
        error = None
        if ctx.is_main:
            busy = (
                f"another training is running in {out_dir}; wait for it to finish or use "
                "another runs folder"
            )
            try:
                held.enter_context(durable.exclusive_lock(out_dir, STAGE_LOCK, busy, remote=False))
            except UserError as e:
                error = str(e)
        error = ctx.broadcast(error)
        if error is not None:
            raise UserError(error)
        yield


def run_train(
    cfg: TrainStageConfig,
    store_url: str,
    out_dir: str,
    force: bool = False,
    progress: bool = True,
    workers: int | None = None,
    earlier: tuple[str, ...] = (),
    say: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Train every model of `cfg` on the store at `store_url` into `out_dir/<name>/`.

    Returns the stage outputs: per model its folder, final training metrics and held-out metrics,
    plus a digest of all weights.  A finished model of the same config is reused; an interrupted
    one resumes; one of another config is refused unless `force` (which starts every model over).
    A second training into the same `out_dir` at the same time is refused.  Under `torchrun` every
    rank calls this with the same arguments and gets the same outputs; only rank 0 writes.
    `workers` > 1 trains that many models at once, each in its own process (an ablation grid on a
    many-core machine); each model's result is that of training it alone.  `earlier`: done
    folders of earlier runs of the stage, newest first; a model that finished there with the same
    training hash is taken from there instead of trained again (`reuse.py`).  One line per model
    goes to `say`: reused or training, and why."""
    ctx = init_from_env()
    store = open_training_store(store_url, cfg.hook)
    d_in = store.d_model(cfg.hook)
    store_hash = manifest_digest(store.manifest)
    models: dict[str, TrainedModelRecord] = {}
    curves: str | None = None
    digest = hashlib.sha256()
    with training_lock(out_dir, ctx):
        # rank 0 reads the folders and decides; every rank follows the same plan
        plans = plan_models(cfg, store_hash, out_dir, earlier, force) if ctx.is_main else []
        carried: dict[str, Any] = {}
        for plan in plans:
            say(plan.line)
            if plan.source is not None:
                copy_model_folder(plan.source, join(out_dir, plan.name))
                if plan.record is not None:
                    carried[plan.name] = {**plan.record, "path": join(out_dir, plan.name)}
        records = {
            name: TrainedModelRecord.model_validate(rec)
            for name, rec in ctx.broadcast(carried).items()
        }
        ctx.barrier()  # the copies are in place before any rank looks at a model folder
        to_train = [name for name in cfg.models if name not in records]
        parallel = bool(workers and workers > 1 and not ctx.enabled and len(to_train) > 1)
        if parallel:
            records |= train_in_processes(
                cfg, store_url, store_hash, d_in, out_dir, force, workers or 1, to_train
            )
        for name in cfg.models:
            model_cfg, train_cfg = cfg.model_for(name), cfg.train_for(name)
            folder = join(out_dir, name)
            record = records.get(name) or train_one(
                name,
                model_cfg,
                train_cfg,
                cfg.hook,
                store,
                store_hash,
                d_in,
                folder,
                force,
                progress,
                ctx,
            )
            models[name] = record
            if ctx.is_main:
                fs, path = fsspec.core.url_to_fs(folder)
                weights = fs.cat_file(f"{path}/{MODEL_FILE}")
                digest.update(name.encode() + weights)
                record.model_digest = durable.digest(weights)
        if ctx.is_main:
            for name, source in cfg.imported.items():
                folder = join(out_dir, name)
                models[name] = import_one(name, source, cfg, store, d_in, folder)
                fs, path = fsspec.core.url_to_fs(folder)
                weights = fs.cat_file(f"{path}/{MODEL_FILE}")
                digest.update(name.encode() + weights)
                models[name].model_digest = durable.digest(weights)
            from compsae.train.curves import write_training_curves

            curves = write_training_curves(out_dir, {n: r.path for n, r in models.items()})
    outputs = TrainOutputs(
        store=store_url,
        hook=cfg.hook,
        heldout_fraction=cfg.heldout_fraction,
        store_manifest_hash=store_hash,
        models=models,
        curves=curves,
        digest=digest.hexdigest()[: durable.DIGEST_DIGITS],
    )
    return ctx.broadcast(outputs.model_dump(mode="json"))


def plan_models(
    cfg: TrainStageConfig,
    store_hash: str,
    out_dir: str,
    earlier: tuple[str, ...],
    force: bool,
) -> list[ModelPlan]:
    """For every trained model of `cfg`, in order: taken from an earlier run of the stage, reused
    from its own folder, or trained (and why)."""
    plans = []
    for name in cfg.models:
        model_cfg, train_cfg = cfg.model_for(name), cfg.train_for(name)
        config_hash = training_hash(model_cfg, train_cfg, cfg.hook, store_hash)
        meta = {
            "model": model_cfg.model_dump(mode="json"),
            "train": train_cfg.model_dump(mode="json"),
            "hook": cfg.hook,
            "store_manifest_hash": store_hash,
        }
        plans.append(plan_model(name, join(out_dir, name), config_hash, meta, earlier, force))
    return plans


def _train_worker(
    cfg_json: dict[str, Any],
    name: str,
    store_url: str,
    store_hash: str,
    d_in: int,
    folder: str,
    force: bool,
    threads: int,
) -> TrainedModelRecord:
    # a pool process may run several models: its thread count is the model's, for this model only
    with torch_threads(threads):
        cfg = TrainStageConfig.model_validate(cfg_json)
        store = open_training_store(store_url, cfg.hook)
        return train_one(
            name,
            cfg.model_for(name),
            cfg.train_for(name),
            cfg.hook,
            store,
            store_hash,
            d_in,
            folder,
            force,
            progress=False,
        )


def train_in_processes(
    cfg: TrainStageConfig,
    store_url: str,
    store_hash: str,
    d_in: int,
    out_dir: str,
    force: bool,
    workers: int,
    names: list[str] | None = None,
) -> dict[str, TrainedModelRecord]:
    """Train the models `names` of `cfg` (default: all), `workers` at a time, each in a fresh
    process; name -> record."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    threads = max(1, (os.cpu_count() or 1) // workers)
    cfg_json = cfg.model_dump(mode="json")
    cfg_json.pop("seeds", None)  # models are already expanded per seed
    records: dict[str, TrainedModelRecord] = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            pool.submit(
                _train_worker,
                cfg_json,
                name,
                store_url,
                store_hash,
                d_in,
                join(out_dir, name),
                force,
                threads,
            ): name
            for name in (cfg.models if names is None else names)
        }
        for fut in tqdm(futures, desc=f"train ({workers} at a time)", unit="model"):
            records[futures[fut]] = fut.result()
    return records


def check_training_memory(
    name: str, model_cfg: ModelConfig, train_cfg: TrainConfig, d_in: int, device: torch.device | str
) -> None:
    """Refuse, before allocating anything, a model whose training cannot fit in `device`'s memory:
    weights, gradients and Adam's two moments (4 copies of every parameter, float32) plus a batch's
    dense latents (a few `[batch, n_latents]` float32 tensors)."""
    with torch.device("meta"):  # shapes only, no memory
        n_params = sum(p.numel() for p in build_model(model_cfg, d_in).parameters())
    need = 4 * 4 * n_params + 4 * 4 * train_cfg.batch_size * model_cfg.n_latents
    check_memory(
        need,
        f"training model {name!r} ({n_params:,} parameters, n_latents {model_cfg.n_latents:,})",
        "lower n_latents or batch_size",
        device=str(device),
    )


def train_one(
    name: str,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    hook: str,
    store: ActivationStore,
    store_hash: str,
    d_in: int,
    folder: str,
    force: bool = False,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> TrainedModelRecord:
    """Train (or resume, or reuse) one model into `folder`; return its output record (complete on
    rank 0 of a data-parallel job; the other ranks skip the held-out evaluation)."""
    ctx = ctx or DistContext()
    config_hash = training_hash(model_cfg, train_cfg, hook, store_hash)
    # rank 0 decides from what it reads, so no rank can see a folder another rank just changed
    existing = ctx.broadcast(read_resume_meta(folder) if ctx.is_main else None)
    if existing is not None and (force or existing.get("config_hash") != config_hash):
        if not force:
            raise UserError(
                f"{folder} holds a checkpoint of another config ({existing.get('config_hash')} != "
                f"{config_hash}); "
                "pass --force to retrain it or use another runs folder"
            )
        if ctx.is_main:
            remove_checkpoint(folder)
        ctx.barrier()
        existing = None

    device = ctx.device(resolve_device(train_cfg.device))
    # the split has its own seed, not the training seed: it is recorded with the checkpoint and
    # every later stage evaluates on exactly these held-out sequences
    split = HeldOutSplit(fraction=train_cfg.heldout_fraction)
    loader = BatchLoader(
        store,
        hook,
        batch_size=train_cfg.batch_size,
        split="train",
        heldout_fraction=split.fraction,
        split_seed=split.seed,
        seed=train_cfg.seed,
        device=device,
        normalize=train_cfg.normalize,
        mix_chunks=train_cfg.mix_chunks,
        num_threads=train_cfg.num_threads,
        prefetch=train_cfg.prefetch,
        part=(ctx.rank, ctx.world_size),
    )  # each rank reads only its share of a batch
    check_training_memory(name, model_cfg, train_cfg, d_in, device)
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg, d_in)
    # step, tokens_seen and finished are the trainer's to fill in at every checkpoint
    meta = CheckpointMeta.start(
        model_cfg,
        d_in,
        hook=hook,
        split=split,
        normalization=Normalization(scale=loader.scale) if train_cfg.normalize else None,
        config_hash=config_hash,
        store_manifest_hash=store_hash,
        name=name,
        train=train_cfg.model_dump(mode="json"),
    )
    trainer = Trainer(
        model,
        model_cfg,
        train_cfg,
        folder,
        meta,
        scale=loader.scale,
        name=name,
        progress=progress,
        dist=ctx,
    )
    loader_state = trainer.resume()
    if loader_state is not None:
        loader.load_state_dict(loader_state)
    last: dict[str, Any] = {}
    published = read_meta(folder)
    # reuse only a finished run whose published files are complete; a crash while publishing the
    # final checkpoint lands in fit(), which has no step left and just writes it again
    reusable = ctx.broadcast(
        bool(
            existing is not None
            and existing.get("finished")
            and published is not None
            and published.get("step") == existing.get("step")
        )
    )
    tracker = None
    if not reusable and ctx.is_main:
        tracker = trainer.tracker = _tracker(
            train_cfg, name, folder, hook, d_in, model_cfg, config_hash
        )
    try:
        if not reusable:
            batches = iter(loader)
            try:
                last = trainer.fit(batches, loader.state_dict)
            finally:
                batches.close()
        if not last and trainer.metrics.lines:  # reused: report the last logged step
            last = json.loads(trainer.metrics.lines[-1])
        record = TrainedModelRecord(path=folder, type=model_cfg.type, split=split)
        if not ctx.is_main:
            return record
        trained = TrainedSAE.load(folder, device, name)
        done = trained.meta
        heldout = heldout_metrics(trained, store, hook, train_cfg)
        if tracker is not None and heldout is not None:
            tracker.summary(heldout)
    finally:
        if tracker is not None:
            tracker.finish()
    return record.model_copy(
        update={
            "step": done.step,
            "tokens_seen": done.tokens_seen,
            "finished": done.finished,
            "final": last,
            "heldout": heldout,
        }
    )


def _tracker(
    cfg: TrainConfig,
    name: str,
    folder: str,
    hook: str,
    d_in: int,
    model_cfg: ModelConfig,
    config_hash: str,
) -> Any:
    """The experiment tracker `cfg.log` asks for (None for "none"): project compsae-<pipeline> (from
    the folder layout `<runs_root>/<pipeline>/train-<hash>/<model>`), grouped by the stage
    folder."""
    if cfg.log == "none":
        return None
    from compsae.train.tracking import make_tracker

    stage_dir = folder.rstrip("/").rsplit("/", 1)[0]
    parts = stage_dir.rsplit("/", 2)
    pipeline = parts[-2] if len(parts) >= 2 else "runs"
    config = {
        "model": model_cfg.model_dump(mode="json"),
        "train": cfg.model_dump(mode="json"),
        "hook": hook,
        "d_in": d_in,
    }
    return make_tracker(
        cfg.log,
        cfg.wandb_project or f"compsae-{pipeline}",
        name,
        parts[-1],
        config,
        f"{name}-{config_hash}",
        stage_dir,
        cfg.wandb_entity,
    )


def import_one(
    name: str,
    source: ImportedSAE,
    cfg: TrainStageConfig,
    store: ActivationStore,
    d_in: int,
    folder: str,
) -> TrainedModelRecord:
    """Import an SAE trained elsewhere into `folder` (beside the trained models); return its output
    record, with held-out metrics on the raw activations it takes."""
    from compsae.train.saelens_import import import_saelens

    split = HeldOutSplit(fraction=cfg.heldout_fraction)  # the trained models' split
    summary = import_saelens(
        source.path,
        folder,
        name=name,
        hook=source.hook,
        expect_hook=cfg.hook,
        expect_d_in=d_in,
        split=split.model_dump(mode="json"),
    )
    sae = TrainedSAE.load(folder, "cpu", name)
    shared = TrainConfig.model_validate({f: getattr(cfg, f) for f in TrainConfig.model_fields})
    return TrainedModelRecord(
        path=folder,
        type=summary["type"],
        imported={"format": source.format, "source": source.path},
        split=split,
        step=sae.meta.step,
        tokens_seen=None,
        finished=True,
        final={},
        heldout=heldout_metrics(sae, store, cfg.hook, shared),
    )


@torch.no_grad()
def heldout_metrics(
    sae: TrainedSAE, store: ActivationStore, hook: str, cfg: TrainConfig
) -> dict[str, float] | None:
    """FVU, MSE (original units), L0 and, for CompSAE, FVU without the composition path and the mean
    gate, on up to `HELDOUT_EVAL_BATCHES` batches of the held-out rows of the split `sae` records;
    None when nothing is held out."""
    split = sae.split
    if split is None or split.fraction <= 0:
        return None
    scale = sae.scale
    try:
        # store units in, the model's scale applied as in training
        loader = BatchLoader(
            store,
            hook,
            batch_size=min(cfg.batch_size, 256),
            split="heldout",
            heldout_fraction=split.fraction,
            split_seed=split.seed,
            seed=cfg.seed,
            device=sae.device,
            normalize=False,
            shuffle=False,
            epochs=1,
            num_threads=cfg.num_threads,
        )
    except UserError:
        return None  # fewer held-out rows than one batch: nothing worth reporting
    full, linear = FVUAccumulator(), FVUAccumulator()
    l0, n, sums = 0.0, 0, {"gate_mean": 0.0}
    batches = iter(loader)
    try:
        for i, x in enumerate(batches):
            if i == HELDOUT_EVAL_BATCHES:
                break
            x = x * scale
            out = sae.model(x)
            full.update(x / scale, out.x_hat / scale)
            if out.comp is not None:
                linear.update(x / scale, (out.x_hat - out.comp) / scale)
            m = batch_metrics(x, out, scale)
            l0 += m["l0"] * x.shape[0]
            sums["gate_mean"] += m.get("gate_mean", 0.0) * x.shape[0]
            n += x.shape[0]
    finally:
        batches.close()
    result = {
        "fvu": full.fvu,
        "mse": full.sq_err / max(1, full.count * store.d_model(hook)),
        "l0": l0 / max(n, 1),
        "tokens": n,
    }
    if linear.count:
        result["fvu_no_comp"] = linear.fvu
        result["gate_mean"] = sums["gate_mean"] / n
    return result
