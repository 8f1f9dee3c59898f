"""`run_analyze`: every trained model and baseline of a pipeline, evaluated on held-out store rows
with Dask, written up as one offline report.

Order of work, one function each: plan (`plan_analysis`: open the store and the checkpoints,
held-out rows of the split recorded in the checkpoints, baselines fitted on training rows, the
latents whose pair statistics are kept) → graph (`compute_partials`: one Dask pass over the
held-out blocks computing every statistic of every model) → metrics (`analysis_metrics`: per
model, CE where the LM loads, the ablation table) → write (top contexts, figures, report.html).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import torch
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm

from compsae.analysis.baselines import fit_baselines, not_converged_line
from compsae.analysis.block_stats import BlockSpec
from compsae.analysis.ce import CEFn, ce_metrics
from compsae.analysis.composition import active_ids
from compsae.analysis.config import AnalyzeConfig
from compsae.analysis.dask_path import (
    acts_array,
    build_graph,
    compute,
    dask_client,
    open_store,
    plan_blocks,
    reference_partials,
)
from compsae.analysis.metrics import latent_table, model_metrics
from compsae.analysis.reconstruction import TopContexts
from compsae.analysis.reconstructors import Reconstructor, SAEReconstructor
from compsae.analysis.records import AnalyzeOutputs
from compsae.analysis.report import write_report
from compsae.analysis.seeds import ablations_by_variant
from compsae.errors import UserError
from compsae.files import CONFIG_FILE, LATENTS_TABLE, TOP_CONTEXTS_TABLE
from compsae.lm.token_text import token_display
from compsae.store import ActivationStore
from compsae.store.sample import spread_rows
from compsae.store.split import HeldOutSplit, shared_split
from compsae.train.config import split_seed_name
from compsae.train.records import CheckpointMeta
from compsae.train.trained import model_folders

PILOT_BLOCKS = 8
TOP_PAIR_EXAMPLES = 10  # composing pairs shown with example tokens
TOP_CONTEXT_COLUMNS = [  # top_contexts.parquet, documented in docs/metrics.md
    "model",
    "latent",
    "rank",
    "activation",
    "row",
    "seq_id",
    "pos",
    "token_id",
    "token_text",
    "context_ids",
    "context_text",
    "after_ids",
    "after_text",
    "repeats",
]
ABLATION_FIELDS = ("type", "n_latents", "k", "composer", "gate", "curriculum", "graduated_sparsity")


def token_decoder(manifest: dict[str, Any]) -> Callable[[int], str]:
    """Token id -> text for the store's tokenizer where it can be loaded offline, else `<id>`."""
    name = str((manifest.get("model") or {}).get("name", ""))
    tok = None
    try:
        if name == "tiny-neox":
            from compsae.lm.byte_tokenizer import byte_tokenizer

            tok = byte_tokenizer()
        elif name == "smollm2-135m" or os.path.isdir(name):
            from transformers import AutoTokenizer

            if name == "smollm2-135m":
                from compsae.lm.offline_assets import smollm2_folder

                name = str(smollm2_folder(download=False))
            tok = AutoTokenizer.from_pretrained(name)
    except Exception:  # noqa: BLE001 - token text is a convenience; ids are the fallback
        tok = None
    cache: dict[int, str] = {}
    show = token_display(tok) if tok is not None else None

    def decode(i: int) -> str:
        if i not in cache:
            cache[i] = show(i) if show is not None else f"<{i}>"
        return cache[i]

    return decode


def fit_rows(store: ActivationStore, hook: str, train_mask: np.ndarray, n: int) -> np.ndarray:
    """Up to `n` training rows `[m, d]`, from chunks spread evenly over the store."""
    rows = spread_rows(store, hook, train_mask, n)
    if len(rows) == 0:
        raise UserError(
            "no training rows to fit the baselines on; lower heldout_fraction or skip baselines"
        )
    return rows


def choose_tracked(
    store: ActivationStore,
    hook: str,
    pos: np.ndarray,
    plan: Any,
    recons: list[Reconstructor],
    limit: int,
) -> dict[str, np.ndarray]:
    """Latents whose pair statistics are kept, per CompSAE: all when they fit in `limit`, else the
    `limit` most frequent on the first `PILOT_BLOCKS` planned blocks (ties to the lower index)."""
    tracked, pilot = {}, []
    for r in recons:
        if r.kind != "compsae":
            continue
        if r.n_latents <= limit:
            tracked[r.name] = np.arange(r.n_latents)
        else:
            pilot.append(r)
    if pilot:
        sub = type(plan)(plan.chunks[:PILOT_BLOCKS], plan.keep)
        parts = reference_partials(
            store,
            hook,
            pos,
            sub,
            pilot,
            BlockSpec(top_k_contexts=0, skip=frozenset({"pairs", "heads", "gate"})),
        )
        for r in pilot:
            fire = parts[r.name]["latents"].fire
            tracked[r.name] = np.sort(np.argsort(-fire, kind="stable")[:limit])
    return tracked


def context_ids(
    store: ActivationStore, rows: np.ndarray, before: int, after: int
) -> tuple[list[list[int]], list[list[int]]]:
    """For each store row of `rows`, the token ids of up to `before` rows before it and itself
    (left context, the row's token last), and of up to `after` rows after it, all in its
    sequence."""
    tokens, seq = store.column_view("tokens"), store.column_view("seq_id")
    n = store.n_rows
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return [], []
    left = rows[:, None] + np.arange(-before, 1)[None, :]  # [m, before+1]
    right = rows[:, None] + np.arange(1, after + 1)[None, :]  # [m, after]
    same_l = (left >= 0) & (seq[np.clip(left, 0, n - 1)] == seq[rows][:, None])
    same_r = (right < n) & (seq[np.clip(right, 0, n - 1)] == seq[rows][:, None])
    ids_l = np.where(same_l, tokens[np.clip(left, 0, n - 1)], -1)
    ids_r = np.where(same_r, tokens[np.clip(right, 0, n - 1)], -1)
    return [r[r >= 0].tolist() for r in ids_l], [r[r >= 0].tolist() for r in ids_r]


def top_context_table(
    name: str,
    top: TopContexts,
    store: ActivationStore,
    window: int,
    decode: Callable[[int], str],
    after: int = 0,
) -> pd.DataFrame:
    """One row per (latent, rank) of distinct contexts: activation, store row, the token, its left
    context (`window` tokens and the token) and the `after` tokens after it.  Top contexts with the
    same token window are one row, the first (highest) kept; `repeats` counts them."""
    lat, rank = np.nonzero(top.rows >= 0)
    rows = top.rows[lat, rank]
    tokens, seq, pos = (store.column_view(c) for c in ("tokens", "seq_id", "pos"))
    ctx_ids, after_ids = context_ids(store, rows, window, after)
    df = pd.DataFrame(
        {
            "model": name,
            "latent": lat,
            "rank": rank,
            "activation": top.values[lat, rank],
            "row": rows,
            "seq_id": seq[rows],
            "pos": pos[rows],
            "token_id": tokens[rows],
            "context_ids": ctx_ids,
            "after_ids": after_ids,
        }
    )
    # the same text repeated (boilerplate, a repeated prompt) would fill a latent's list
    window_key = pd.Series(
        [f"{c}|{a}" for c, a in zip(ctx_ids, after_ids, strict=True)], index=df.index
    )
    group = [df["latent"], window_key]
    df["repeats"] = df.groupby(group)["rank"].transform("size").astype(np.int64)
    df = df[~pd.DataFrame({"l": df["latent"], "w": window_key}).duplicated()]
    df = df.reset_index(drop=True)
    df["rank"] = df.groupby("latent").cumcount().astype(np.int64)
    df["token_text"] = [decode(int(t)) for t in df["token_id"]]
    df["context_text"] = ["".join(decode(i) for i in c) for c in df["context_ids"]]
    df["after_text"] = ["".join(decode(i) for i in c) for c in df["after_ids"]]
    return df[TOP_CONTEXT_COLUMNS]


def attention_examples(
    rec: SAEReconstructor,
    store: ActivationStore,
    hook: str,
    plan: Any,
    n: int,
    decode: Callable[[int], str],
) -> list[dict[str, Any]]:
    """A few held-out tokens (position > 0) with the head-mean attention among their active
    latents."""
    if n == 0:
        return []
    tokens, seq = store.column_view("tokens"), store.column_view("seq_id")
    rows = np.flatnonzero(plan.keep)
    rows = rows[store.column_view("pos")[rows] > 0]
    if rows.size == 0:
        return []
    picks = rows[np.linspace(0, rows.size - 1, n).astype(int)]
    x = np.stack([store.read_rows(hook, int(r), int(r) + 1)[0] for r in picks])
    out = rec(x)
    if out.attn is None or out.active_idx is None:
        return []
    act = active_ids(out.active_idx, out.z)
    examples = []
    for i, r in enumerate(picks):
        on = act[i] >= 0
        w = out.attn[i].mean(0)[np.ix_(on, on)]
        lo = max(int(r) - 12, 0)
        ctx = [int(t) for t, s in zip(tokens[lo:r], seq[lo:r], strict=True) if s == seq[r]]
        examples.append(
            {
                "model": rec.name,
                "row": int(r),
                "token": decode(int(tokens[r])),
                "context": "".join(decode(t) for t in ctx),
                "latents": act[i][on].tolist(),
                "attn": w.tolist(),
            }
        )
    return examples


def pair_examples(
    rec: SAEReconstructor,
    store: ActivationStore,
    hook: str,
    plan: Any,
    pairs: list[dict[str, Any]],
    decode: Callable[[int], str],
    per_pair: int = 3,
    max_rows: int = 4096,
    include_sequence_start: bool = False,
    after: int = 0,
) -> None:
    """Add to each of `pairs` (dicts with latents "i", "j") up to `per_pair` held-out tokens where
    both fire, as {"token", "context", "after"}, from the first `max_rows` evaluated rows (position
    0 left out unless `include_sequence_start`)."""
    rows = _shown_rows(store, plan.keep, include_sequence_start)[:max_rows]
    if rows.size == 0 or not pairs:
        return
    lo, hi = int(rows.min()), int(rows.max()) + 1
    z = rec(store.read_rows(hook, lo, hi)[rows - lo]).z  # [rows, n]
    tokens = store.column_view("tokens")
    for pair in pairs:
        both = rows[np.flatnonzero((z[:, pair["i"]] > 0) & (z[:, pair["j"]] > 0))[:per_pair]]
        left, right = context_ids(store, both, 12, after)
        pair["examples"] = [
            {
                "token": decode(int(tokens[r])),
                "context": "".join(decode(t) for t in ctx[:-1]),
                "after": "".join(decode(t) for t in aft),
            }
            for r, ctx, aft in zip(both, left, right, strict=True)
        ]


def _shown_rows(
    store: ActivationStore, keep: np.ndarray, include_sequence_start: bool
) -> np.ndarray:
    """The evaluated rows (`keep`) whose examples are shown: position 0 left out unless asked."""
    rows = np.flatnonzero(keep)
    return rows if include_sequence_start else rows[store.column_view("pos")[rows] > 0]


def _profile_pairs(
    rec: SAEReconstructor,
    ap: AnalysisPlan,
    pairs: list[dict[str, Any]],
    decode: Callable[[int], str],
    max_rows: int = 8192,
    include_sequence_start: bool = False,
) -> None:
    """`pair_profile.pair_profiles` of the top pairs on the first `max_rows` evaluated rows, with
    the LM's unembedding where the hook is in the residual stream and the LM loads (position 0
    left out unless `include_sequence_start`)."""
    from compsae.analysis.browser import load_unembedding
    from compsae.analysis.pair_profile import pair_profiles

    rows = _shown_rows(ap.store, ap.blocks.keep, include_sequence_start)[:max_rows]
    if rows.size == 0 or not pairs or not hasattr(rec.model, "active"):
        return
    lo, hi = int(rows.min()), int(rows.max()) + 1
    x = ap.store.read_rows(ap.hook, lo, hi)[rows - lo]
    token_ids = np.asarray(ap.store.column_view("tokens")[lo:hi])[rows - lo]
    w_u, _ = load_unembedding(ap.store.manifest, ap.hook)
    if w_u is not None and w_u.shape[0] != x.shape[1]:
        w_u = None  # not the space this hook writes (a store of other activations)
    pair_profiles(rec.model, rec.scale, x, token_ids, pairs, decode, w_u)


def heldout_sequences(store: ActivationStore, keep: np.ndarray, n: int) -> np.ndarray:
    """`[≤n, ctx]` token ids of whole held-out sequences (rows of a sequence are contiguous)."""
    ctx = int(store.manifest.get("context", 0))
    seq, pos, tokens = (store.column_view(c) for c in ("seq_id", "pos", "tokens"))
    starts = np.flatnonzero(keep)
    starts = starts[pos[starts] == 0]
    out = []
    for s in starts:
        if s + ctx <= len(seq) and seq[s + ctx - 1] == seq[s] and pos[s + ctx - 1] == ctx - 1:
            out.append(tokens[s : s + ctx])
        if len(out) >= n:
            break
    return np.asarray(out, dtype=np.int64).reshape(-1, ctx)


def find_ce_fn(manifest: dict[str, Any], hook: str) -> tuple[CEFn | None, str]:
    """The harvest stage's CE function for this store's LM, or (None, why not)."""
    from compsae.harvest.ce import (
        make_ce_fn,
    )  # here: it loads the LM stack only when CE is asked for

    try:
        return make_ce_fn(manifest, hook), ""
    except (UserError, OSError) as e:
        return None, f"skipped: the LM could not be loaded ({e})"


@dataclass
class AnalysisPlan:
    """What one analysis evaluates: the models (and fitted baselines) on the held-out blocks of one
    hook, and the latents whose pair statistics are kept."""

    store: ActivationStore
    hook: str
    split: HeldOutSplit
    blocks: Any  # the planned held-out blocks (`plan_blocks`)
    recons: list[Reconstructor]  # trained models first, then the baselines
    sae_names: frozenset[str]  # the trained (or imported) models among `recons`
    metas: dict[str, CheckpointMeta]
    baseline_k: int
    tracked: dict[str, np.ndarray]
    notes: list[str]


def plan_analysis(
    cfg: AnalyzeConfig, store_url: str, train_dir: str, trust_unverified: bool = False
) -> AnalysisPlan:
    """Open the store and the checkpoints, keep the models of one hook and one held-out split (the
    split recorded in the checkpoints), plan the held-out blocks, fit the baselines on training
    rows and choose the tracked latents.  `trust_unverified`: see `run_analyze`."""
    store = open_store(store_url)
    found = model_folders(train_dir)
    if not found:
        raise UserError(
            f"no trained models under {train_dir} (expected one folder per model with "
            f"{CONFIG_FILE})"
        )
    recons: list[Reconstructor] = [
        SAEReconstructor.from_checkpoint(n, d, cfg.batch_rows, trust_unverified) for n, d in found
    ]
    metas: dict[str, CheckpointMeta] = {r.name: r.meta for r in recons}  # type: ignore[attr-defined]
    hook = cfg.hook or metas[recons[0].name].hook or store.hooks[0]
    if hook not in store.hooks:
        raise UserError(
            f"the store has no hook {hook!r}; it holds {', '.join(store.hooks)} (set analyze.hook)"
        )
    notes = []
    other = [r.name for r in recons if metas[r.name].hook not in ("", hook)]
    if other:
        notes.append(f"models trained on another hook left out: {', '.join(other)}")
        recons = [r for r in recons if r.name not in other]
    split, other = shared_split({r.name: metas[r.name].split for r in recons})
    if other:  # scored on another split, part of their held-out rows would be their training rows
        notes.append(f"models trained with another held-out split left out: {', '.join(other)}")
        recons = [r for r in recons if r.name not in other]
    heldout = split.store_mask(store)
    blocks = plan_blocks(heldout, store.chunk_rows, cfg.max_heldout_tokens)

    compsae_k = [m.model.k for m in metas.values() if m.model.type == "compsae"]
    k = cfg.baseline_k or (compsae_k[0] if compsae_k else 32)
    sae_names = frozenset(r.name for r in recons)
    if "baselines" not in cfg.skip and cfg.baselines:
        x_fit = fit_rows(store, hook, ~heldout, cfg.baseline_fit_tokens)
        baselines = fit_baselines(list(cfg.baselines), x_fit, k, cfg.nmf_components, cfg.seed)
        for b in baselines:
            line = not_converged_line(b.name, getattr(b, "fit_info", None))
            if line is not None:
                tqdm.write(f"analyze: {line}")
                notes.append(line)
        recons += baselines
    tracked = (
        choose_tracked(store, hook, store.column_view("pos"), blocks, recons, cfg.pair_latents)
        if "pairs" not in cfg.skip
        else {}
    )
    return AnalysisPlan(store, hook, split, blocks, recons, sae_names, metas, k, tracked, notes)


def compute_partials(
    ap: AnalysisPlan, cfg: AnalyzeConfig, workers: int, scheduler: str | None, processes: bool
) -> dict[str, Any]:
    """One Dask pass over the held-out blocks: every statistic of every model, merged per model."""
    spec = BlockSpec(
        top_k_contexts=cfg.top_k_contexts,
        skip=frozenset(cfg.skip),
        tracked=ap.tracked,
        contexts_for=ap.sae_names,
        pair_null=cfg.pair_fdr is not None,
        include_sequence_start=cfg.include_sequence_start,
    )
    graph = build_graph(
        acts_array(ap.store, ap.hook), ap.store.column_view("pos"), ap.blocks, ap.recons, spec
    )
    with dask_client(workers, scheduler, cfg.threads_per_worker, processes) as client:
        return compute(graph, client, cfg.progress)


def analysis_metrics(
    ap: AnalysisPlan, cfg: AnalyzeConfig, partials: dict[str, Any], ce_fn: CEFn | None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """metrics.json's content (per model, CE where the LM loads, the ablation table) and the arrays
    the figures and tables are drawn from."""
    models: dict[str, Any] = {}
    arrays: dict[str, dict[str, Any]] = {}
    for r in ap.recons:
        m, arr = model_metrics(
            partials[r.name],
            cfg.dense_thresholds,
            cfg.partner_threshold,
            ap.tracked.get(r.name),
            pair_fdr=cfg.pair_fdr,
            pair_min_support=cfg.pair_min_support,
        )
        m["kind"] = r.kind
        if getattr(r, "fit_info", None) is not None:
            m["fit"] = r.fit_info  # converged or not, after how many iterations (NMF)
        meta = ap.metas.get(r.name)
        if meta is not None and meta.model.type == "compsae":
            m["composer"] = meta.model.composer  # what the composition numbers are (views)
            m["gate_on"] = bool(meta.model.gate)
            if meta.model.composer == "pair":
                m["pair_selection"] = meta.model.pair_selection
                m["pair_fit"] = meta.model.pair_fit
        models[r.name], arrays[r.name] = m, arr

    ce_note = "off in the config"
    if cfg.ce and "ce" not in cfg.skip:
        fn, ce_note = (ce_fn, "") if ce_fn is not None else find_ce_fn(ap.store.manifest, ap.hook)
        seqs = heldout_sequences(ap.store, ap.blocks.keep, cfg.ce_sequences)
        if fn is not None and len(seqs) == 0:
            ce_note = "skipped: no whole held-out sequence in the evaluated rows"
        elif fn is not None:
            tok = torch.as_tensor(seqs)
            for r in ap.recons:
                models[r.name]["ce"] = ce_metrics(fn, tok, _splice(r))
            ce_note = f"{len(seqs)} held-out sequences, {int(seqs.size)} tokens"
            if cfg.pair_causal:
                for r in ap.recons:
                    causal = _pair_causal(
                        r,
                        partials[r.name],
                        ap.tracked.get(r.name),
                        fn,
                        tok,
                        cfg.seed,
                        cfg.pair_causal_own_max,
                        cfg.progress,
                    )
                    if causal is not None:
                        models[r.name]["pair_causal"] = causal

    ablations = []
    for r in ap.recons:
        if r.name not in ap.sae_names:
            continue
        mc, a = ap.metas[r.name].model.model_dump(), models[r.name]["all"]
        ablations.append(
            {
                "model": r.name,
                **{f: mc.get(f) for f in ABLATION_FIELDS},
                "l0": a["l0"],
                "fvu": a["fvu"],
                "fvu_nocomp": a.get("fvu_nocomp"),
                "comp_share": a.get("comp_share"),
                "dead_fraction": models[r.name].get("latents", {}).get("dead_fraction"),
                "ce_recovered": models[r.name].get("ce", {}).get("ce_recovered"),
                "tokens_seen": ap.metas[r.name].tokens_seen,
            }
        )
    stability = _pair_stability(ap, arrays)
    metrics = {
        "hook": ap.hook,
        "store": ap.store.url,
        "n_tokens": ap.blocks.n_tokens,
        "heldout_fraction": ap.split.fraction,
        "heldout_seed": ap.split.seed,
        "baseline_k": ap.baseline_k,
        "models": models,
        "ablations": ablations,
        "ablations_by_variant": ablations_by_variant(ablations),
        "ce_note": ce_note,
        "notes": ap.notes,
        "include_sequence_start": cfg.include_sequence_start,
        "sequence_start_rows": int(
            (ap.store.column_view("pos")[np.flatnonzero(ap.blocks.keep)] == 0).sum()
        ),
    }
    if stability:
        metrics["pair_stability"] = stability
    return metrics, arrays


def _pair_stability(ap: AnalysisPlan, arrays: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed stability of the pair effects (`pair_stability.seed_stability`) for every variant
    trained with two or more seeds whose pair effects were measured, as rows.  A variant is the
    model name without its `__s<seed>` suffix (`train.seeds`, or a model named so by hand with its
    own `train.seed`); the seed is the one the checkpoint was trained with."""
    from dataclasses import asdict

    from compsae.analysis.pair_stability import SeedPairs, seed_stability

    by_variant: dict[str, dict[int, tuple[str, SeedPairs]]] = {}
    for r in ap.recons:
        arr = arrays.get(r.name, {})
        variant, suffix = split_seed_name(r.name)
        if "pair_effect" not in arr or not isinstance(r, SAEReconstructor):
            continue
        meta = ap.metas.get(r.name)
        trained = (meta.train or {}) if meta is not None else {}
        seed = int(trained.get("seed", suffix if suffix is not None else 0))
        co = np.asarray(arr["cooccurrence"], dtype=np.float64).copy()
        np.fill_diagonal(co, 0)
        dec = r.model.W_dec.detach().float().cpu().numpy()
        seeds = by_variant.setdefault(variant, {})
        pairs = SeedPairs(dec, arr["tracked"], arr["pair_effect"], arr["pmi"], co)
        seeds.setdefault(seed, (r.name, pairs))
    rows = []
    for variant, named in sorted(by_variant.items()):
        st = seed_stability({s: p for s, (_, p) in named.items()})
        if st is not None:
            first = sorted(named)[:2]
            rows.append({"variant": variant, "models": [named[s][0] for s in first], **asdict(st)})
    return rows


def run_analyze(
    cfg: AnalyzeConfig,
    store_url: str,
    train_dir: str,
    out_dir: str,
    workers: int | None = None,
    scheduler: str | None = None,
    processes: bool = True,
    ce_fn: CEFn | None = None,
    decode: Callable[[int], str] | None = None,
    trust_unverified: bool = False,
) -> dict[str, Any]:
    """Analyse every model under `train_dir` (one folder each) and the baselines on the store's
    held-out rows; write report.html, metrics.json/.parquet, latents.parquet, top_contexts.parquet
    and figures/ into `out_dir`.  `workers` / `scheduler` override the config's (CLI flags);
    `trust_unverified` loads checkpoints without any content digest (with a warning).
    Returns the stage outputs (file names and headline numbers)."""
    workers = cfg.workers if workers is None else workers
    scheduler = cfg.scheduler if scheduler is None else scheduler
    ap = plan_analysis(cfg, store_url, train_dir, trust_unverified)
    partials = compute_partials(ap, cfg, workers, scheduler, processes)
    metrics, arrays = analysis_metrics(ap, cfg, partials, ce_fn)
    metrics["store"] = store_url
    metrics["scheduler"] = scheduler or (f"LocalCluster({workers})" if workers else "threads")

    decode = decode or token_decoder(ap.store.manifest)
    for r in ap.recons:
        top = metrics["models"][r.name].get("pairs", {}).get("top_pairs")
        if top and isinstance(r, SAEReconstructor):
            pair_examples(
                r,
                ap.store,
                ap.hook,
                ap.blocks,
                top[:TOP_PAIR_EXAMPLES],
                decode,
                include_sequence_start=cfg.include_sequence_start,
                after=cfg.context_after,
            )
            _profile_pairs(r, ap, top[:TOP_PAIR_EXAMPLES], decode, cfg.include_sequence_start)
    examples = []
    for r in ap.recons:
        # the attention examples exist only where the composer attends
        composer = metrics["models"][r.name].get("composer")
        if composer == "attention" and len(examples) == 0 and cfg.plots:
            examples = attention_examples(
                r,
                ap.store,
                ap.hook,
                ap.blocks,
                cfg.n_attention_examples,  # type: ignore[arg-type]
                decode,
            )
    saes = [r for r in ap.recons if r.name in ap.sae_names]
    return _write_outputs(
        out_dir, cfg, metrics, arrays, examples, partials, ap.store, decode, saes, ap.blocks.keep
    )


def _pair_causal(
    rec: Reconstructor,
    part: dict[str, Any],
    rows: np.ndarray | None,
    fn: CEFn,
    tok: torch.Tensor,
    seed: int,
    own_max: int = 100,
    progress: bool = False,
) -> list[dict[str, Any]] | None:
    """The causal pair test (`pair_causal`) for a model with measured pair effects, as rows."""
    from dataclasses import asdict

    from compsae.analysis.pair_causal import run_pair_causal

    effects = part.get("effects")
    if effects is None or rows is None or not isinstance(rec, SAEReconstructor):
        return None
    model = rec.model
    n = rec.n_latents
    eff, cnt = np.zeros((n, n)), np.zeros((n, n))
    eff[np.ix_(rows, rows)] = effects.mean_effect()
    c = effects.count + effects.count.T
    cnt[np.ix_(rows, rows)] = np.triu(c, 1) + np.triu(c, 1).T

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, idx, vals = model.active(x)
        return idx, vals

    recs = run_pair_causal(
        model,
        fn,
        tok,
        encode,
        eff,
        np.triu(cnt, 1),
        seed=seed,
        scale=rec.scale,
        own_max=own_max,
        progress=progress,
    )
    return [asdict(r) for r in recs]


def _pair_causal_figures(work: str, metrics: dict[str, Any]) -> dict[str, str]:
    """figures/pair_causal_<model>.png (ΔCE vs N with both controls) for models with causal rows."""
    from compsae.analysis.pair_causal import PairCausalRecord, plot_pair_causal

    out = {}
    for name, m in metrics["models"].items():
        rows = m.get("pair_causal")
        if rows:
            rel = os.path.join("figures", f"pair_causal_{name}.png")
            os.makedirs(os.path.join(work, "figures"), exist_ok=True)
            plot_pair_causal([PairCausalRecord(**r) for r in rows], os.path.join(work, rel))
            out[f"pair_causal_{name}"] = rel
    return out


def _splice(rec: Reconstructor) -> Callable[[torch.Tensor], torch.Tensor]:
    def replace(acts: torch.Tensor) -> torch.Tensor:  # [b, ctx, d] -> x̂ of the same shape
        flat = acts.detach().float().cpu().reshape(-1, acts.shape[-1]).numpy()
        x_hat = torch.as_tensor(rec(flat).x_hat).reshape(acts.shape)
        return x_hat.to(acts.dtype).to(acts.device)

    return replace


def _write_outputs(
    out_dir: str,
    cfg: AnalyzeConfig,
    metrics: dict[str, Any],
    arrays: dict[str, dict[str, Any]],
    examples: list[dict[str, Any]],
    partials: dict[str, Any],
    store: ActivationStore,
    decode: Callable[[int], str],
    saes: list[Reconstructor] | None = None,
    keep: np.ndarray | None = None,
) -> dict[str, Any]:
    fs, path = fsspec.core.url_to_fs(out_dir)
    local = isinstance(fs, LocalFileSystem)
    work = path if local else tempfile.mkdtemp(prefix="compsae-analyze-")
    try:
        files: dict[str, Any] = {}
        os.makedirs(work, exist_ok=True)
        lat = pd.concat([latent_table(n, a) for n, a in arrays.items()], ignore_index=True)
        lat.to_parquet(os.path.join(work, LATENTS_TABLE), index=False)
        files["latents"] = LATENTS_TABLE
        tops = [
            top_context_table(n, p["top"], store, cfg.context_window, decode, cfg.context_after)
            for n, p in partials.items()
            if p.get("top") is not None
        ]
        top_df = pd.concat(tops, ignore_index=True) if tops else pd.DataFrame()
        if tops:
            top_df.to_parquet(os.path.join(work, TOP_CONTEXTS_TABLE), index=False)
            files["top_contexts"] = TOP_CONTEXTS_TABLE
        if cfg.browser and saes and keep is not None and len(lat):
            from compsae.analysis.browser import write_browsers

            metrics["browsers"] = files["browsers"] = write_browsers(
                work,
                saes,
                lat,
                top_df,
                arrays,
                store,
                metrics["hook"],
                keep,
                decode,
                cfg.browser_contexts,
                cfg.context_window,
                cfg.browser_hist_rows,
                after=cfg.context_after,
                partners_shown=cfg.browser_partners,
                pairs={
                    name: m.get("pairs", {}).get("top_pairs", [])[:TOP_PAIR_EXAMPLES]
                    for name, m in metrics["models"].items()
                },
            )
        files.update(write_report(work, metrics, arrays, examples, plots=cfg.plots))
        if cfg.plots:
            files.update(_pair_causal_figures(work, metrics))
        if not local:
            fs.put(work.rstrip("/") + "/", path, recursive=True)
    finally:
        if not local:
            shutil.rmtree(work, ignore_errors=True)
    headline = {
        n: {"fvu": m["all"]["fvu"], "l0": m["all"]["l0"]} for n, m in metrics["models"].items()
    }
    return AnalyzeOutputs(
        files=files, n_tokens=metrics["n_tokens"], hook=metrics["hook"], headline=headline
    ).model_dump(mode="json")
