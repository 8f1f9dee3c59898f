"""The ``probe`` stage: task probes for a real pipeline (the harvested LM and the SAEs trained on
it).

1. Rebuild the LM from the store's manifest and measure its own behaviour on each family
   (forced-choice accuracy, log-prob difference, a one-sided binomial test against chance).
2. Take the hook activation at every item's decision point and map it through every feature map:
   each trained SAE's latents (the checkpoint's normalisation applied first, as in training), PCA
   and NMF fitted on training-split store rows, and the raw residual channels.
3. k-sparse probes of the input variables, and of the answer only where the LM computes it.
4. The conjunction test for every CompSAE with a composition path, against its control (the
   reconstruction with the path switched off).

Writes ``probes.json`` (every number), ``probes.md`` (the tables) and ``probes.png``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np
import torch
from scipy.stats import binomtest

from compsae.analysis.baselines import not_converged_line
from compsae.errors import UserError
from compsae.evaluation.probes.config import ProbeConfig
from compsae.evaluation.probes.pair_features import pair_feature_map
from compsae.evaluation.probes.records import ProbeOutputs
from compsae.evaluation.probes.tasks import (
    ANSWER_TASKS,
    TASKS,
    FeatureFn,
    ProbeItem,
    decision_activations,
    lm_behaviour,
    make_items,
    nmf_features,
    pca_features,
    run_conjunctions,
    run_probes,
)
from compsae.figures import plain_text, pyplot
from compsae.files import PROBES_JSON, PROBES_MD, PROBES_PNG
from compsae.harvest.records import HarvestOutputs
from compsae.registry import StageContext
from compsae.store import ActivationStore
from compsae.store.sample import spread_rows
from compsae.store.split import HeldOutSplit
from compsae.train.trained import TrainedSAE, load_trained

BASELINES = ("pca", "nmf", "raw")
_SAE_BATCH = 1024  # rows per SAE forward


@torch.no_grad()
def sae_outputs(sae: TrainedSAE, x: np.ndarray) -> dict[str, np.ndarray]:
    """``x: [n, d]`` (store units) -> latents ``z: [n, m]`` and, with a composition path, ``comp:
    [n, d]`` (its gated output) and ``linear: [n, d]`` (the reconstruction with the path off)."""
    parts: dict[str, list[np.ndarray]] = {"z": [], "comp": [], "linear": []}
    for i in range(0, len(x), _SAE_BATCH):
        out = sae.forward(x[i : i + _SAE_BATCH])
        parts["z"].append(out.z.float().cpu().numpy())
        if out.comp is not None:
            parts["comp"].append(out.comp.float().cpu().numpy())
            parts["linear"].append(
                (out.x_hat - out.comp).float().cpu().numpy()
            )  # x_hat holds the path
    return {k: np.concatenate(v) for k, v in parts.items() if v}


def sae_feature(sae: TrainedSAE, key: str) -> FeatureFn:
    """One output of `sae_outputs` as a feature map."""
    return lambda x: sae_outputs(sae, x)[key]


def fit_sample(
    store: ActivationStore, hook: str, splits: list[HeldOutSplit], n: int, drop_bos: bool
) -> np.ndarray:
    """Up to ``n`` rows ``[m, d]`` that no model held out (``splits``: the ones the SAEs were
    trained with; none for SAEs trained elsewhere), BOS rows left out when ``drop_bos``: a decision
    point is never a BOS position, and BOS rows are huge-norm outliers that would take the first PCA
    / NMF components."""
    keep = np.ones(store.n_rows, dtype=bool)
    for split in set(splits):
        keep &= ~split.store_mask(store)
    if drop_bos:
        for lo, pos in store.column_parts("pos"):  # shard by shard: never the whole column
            keep[lo : lo + len(pos)] &= pos != 0
    rows = spread_rows(store, hook, keep, n)
    if len(rows) == 0:
        raise UserError(
            f"the store at {store.url} has no row outside the held-out split to fit PCA / NMF on"
        )
    return rows


def lm_computes(behaviour: dict[str, float], alpha: float) -> tuple[float, bool]:
    """One-sided binomial p-value of the forced-choice accuracy against chance (1/2), and whether
    it is below ``alpha``."""
    n = int(behaviour["n"])
    hits = int(round(behaviour["accuracy"] * n))
    p = float(binomtest(hits, n, 0.5, alternative="greater").pvalue)
    return p, p < alpha


def probed_tasks(
    families: list[str], computes: dict[str, bool], policy: str
) -> dict[str, list[str]]:
    """Task names to probe per family: input variables always, answer tasks per ``policy``."""
    out = {}
    for f in families:
        answers = policy == "always" or (policy == "auto" and computes[f])
        out[f] = [t for t in TASKS[f] if t not in ANSWER_TASKS[f] or answers]
    return out


# ---------------------------------------------------------------------------------------------
# Summaries, tables and the figure


def summary(rows: list[dict], families: list[str], methods: list[str], ks: list[int]) -> list[dict]:
    """Mean held-out accuracy / F1 / majority baseline over a family's probed tasks, per method and
    k."""
    out = []
    for f in families:
        for m in methods:
            for k in ks:
                sel = [r for r in rows if r["family"] == f and r["method"] == m and r["k"] == k]
                if sel:
                    out.append(
                        {
                            "family": f,
                            "method": m,
                            "k": k,
                            "n_tasks": len(sel),
                            "accuracy": float(np.mean([r["accuracy"] for r in sel])),
                            "f1": float(np.mean([r["f1"] for r in sel])),
                            "majority": float(np.mean([r["majority"] for r in sel])),
                        }
                    )
    return out


def fmt(v: Any) -> str:
    """How every number appears in probes.md (3 significant digits, as every report; the tests parse
    it back)."""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return lines


def markdown(report: dict) -> str:
    """probes.md: the LM's behaviour, per-family summaries, per-task probes and the conjunction
    test."""
    ks = report["config"]["ks"]
    lines = [
        f"# Task probes at {report['hook']}",
        "",
        f"LM: {report['lm']}; items per family: {report['config']['n_items']}; "
        f"held-out fraction {report['config']['test_fraction']}.",
        "",
    ]
    for note in report["notes"]:
        lines.append(f"- {note}")
    lines += ["", "## LM behaviour (forced choice, chance = 0.5)", ""]
    lines += _table(
        ["family", "accuracy", "logprob_diff", "logprob_diff_sd", "p_value", "computes", "n"],
        [
            [
                f,
                b["accuracy"],
                b["logprob_diff"],
                b["logprob_diff_sd"],
                b["p_value"],
                "yes" if b["computes"] else "no",
                b["n"],
            ]
            for f, b in report["behaviour"].items()
        ],
    )
    lines += ["", "## Mean held-out accuracy over each family's probed tasks", ""]
    for f in report["config"]["families"]:
        sel = [s for s in report["summary"] if s["family"] == f]
        if not sel:
            continue
        lines += [f"### {f} ({', '.join(report['tasks'][f])})", ""]
        methods = list(dict.fromkeys(s["method"] for s in sel))
        by = {(s["method"], s["k"]): s for s in sel}
        lines += _table(
            ["method", *[f"acc k={k}" for k in ks], *[f"f1 k={k}" for k in ks], "majority"],
            [
                [
                    m,
                    *[by[m, k]["accuracy"] for k in ks],
                    *[by[m, k]["f1"] for k in ks],
                    by[m, ks[0]]["majority"],
                ]
                for m in methods
            ],
        )
        lines.append("")
    lines += ["## Per task", ""]
    lines += _table(
        ["family", "task", "kind", "method", "k", "accuracy", "f1", "majority"],
        [
            [
                r["family"],
                r["task"],
                r["kind"],
                r["method"],
                r["k"],
                r["accuracy"],
                r["f1"],
                r["majority"],
            ]
            for r in report["probes"]
        ],
    )
    lines += ["", "## Conjunction test (A ∧ B; evidence is gain_over_control)", ""]
    if report["conjunctions"]:
        done = [r for r in report["conjunctions"] if "skipped" not in r]
        lines += _table(
            [
                "model",
                "family",
                "conjunction",
                "positive_rate",
                "majority",
                "constituents",
                "with_composition",
                "with_control",
                "gain_over_control",
            ],
            [
                [
                    r["model"],
                    r["family"],
                    r["conjunction"],
                    r["positive_rate"],
                    r["majority"],
                    r["accuracy_constituents"],
                    r["accuracy_with_composition"],
                    r["accuracy_with_control"],
                    r["gain_over_control"],
                ]
                for r in done
            ],
        )
        lines += [
            f"- {r['model']} {r['family']} {r['conjunction']}: skipped ({r['skipped']})"
            for r in report["conjunctions"]
            if "skipped" in r
        ]
    else:
        lines.append("No CompSAE model with a composition path: no conjunction test.")
    return "\n".join(lines) + "\n"


@plain_text
def figure(report: dict, path: str) -> None:
    """Accuracy vs k per feature map, one panel per family, the majority baseline dashed."""
    plt = pyplot()

    families = [
        f for f in report["config"]["families"] if any(s["family"] == f for s in report["summary"])
    ]
    fig, axes = plt.subplots(
        1, max(1, len(families)), figsize=(4.2 * max(1, len(families)), 3.6), squeeze=False
    )
    for ax, f in zip(axes[0], families, strict=False):
        sel = [s for s in report["summary"] if s["family"] == f]
        for m in dict.fromkeys(s["method"] for s in sel):
            pts = sorted((s["k"], s["accuracy"]) for s in sel if s["method"] == m)
            ax.plot(*zip(*pts, strict=True), marker="o", label=m)
        ax.axhline(
            np.mean([s["majority"] for s in sel]), color="grey", linestyle="--", label="majority"
        )
        ax.set(
            title=f"{f} (LM acc {report['behaviour'][f]['accuracy']:.2f})",
            xlabel="k",
            ylabel="held-out accuracy",
            xticks=report["config"]["ks"],
        )
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with fsspec.open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The stage


def _feature_maps(
    saes: list[TrainedSAE],
    x_fit: np.ndarray,
    cfg: ProbeConfig,
    notes: list[str],
    fits: dict[str, dict[str, Any]],
) -> dict[str, FeatureFn]:
    n, d = x_fit.shape
    n_pca = min(cfg.pca_components, n, d)
    n_nmf = min(cfg.nmf_components, n, 2 * d)
    if n_pca < cfg.pca_components or n_nmf < cfg.nmf_components:
        notes.append(
            f"PCA / NMF components capped at {n_pca} / {n_nmf} by the {n} fit rows of width {d}"
        )
    maps: dict[str, FeatureFn] = {}
    for s in saes:
        maps[s.name if s.name not in BASELINES else f"{s.name}-sae"] = sae_feature(s, "z")
    for s in saes:
        with_pairs = pair_feature_map(s, x_fit, cfg.pair_features)
        if with_pairs is not None:
            maps[f"{s.name}+pairs"] = with_pairs
    maps["pca"] = pca_features(x_fit, n_pca, cfg.seed)
    fits["nmf"] = {}
    maps["nmf"] = nmf_features(x_fit, n_nmf, cfg.seed, fit=fits["nmf"])
    line = not_converged_line("nmf", fits["nmf"])
    if line is not None:
        notes.append(line)
    maps["raw"] = lambda x: x
    return maps


def _write(out_dir: str, report: dict) -> list[str]:
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    files = [f"{out_dir}/{PROBES_JSON}", f"{out_dir}/{PROBES_MD}", f"{out_dir}/{PROBES_PNG}"]
    with fs.open(f"{root}/{PROBES_JSON}", "w") as fh:
        json.dump(report, fh, indent=1, default=float)
    with fs.open(f"{root}/{PROBES_MD}", "w") as fh:
        fh.write(markdown(report))
    figure(report, files[2])
    return files


def headline(report: dict) -> dict[str, Any]:
    """Per family: the LM's accuracy, and the best feature map at the largest k with its accuracy;
    per CompSAE model and conjunction: the gain over the control."""
    k = report["config"]["ks"][-1]
    out: dict[str, Any] = {}
    for f in report["config"]["families"]:
        sel = [s for s in report["summary"] if s["family"] == f and s["k"] == k]
        best = max(sel, key=lambda s: s["accuracy"]) if sel else None
        out[f] = {
            "lm_accuracy": report["behaviour"][f]["accuracy"],
            "lm_computes": report["behaviour"][f]["computes"],
            f"best_method_k{k}": best["method"] if best else None,
            f"best_accuracy_k{k}": best["accuracy"] if best else None,
            "majority": best["majority"] if best else None,
        }
    for r in report["conjunctions"]:
        if "skipped" not in r:
            out[f"{r['model']}/{r['conjunction']}_gain_over_control"] = r["gain_over_control"]
    return out


def run(cfg: ProbeConfig, ctx: StageContext) -> ProbeOutputs:
    """The stage (`compsae.registry`): the LM of the harvest's store and the train stage's
    models."""
    return ProbeOutputs.model_validate(
        run_probe(
            cfg,
            ctx.outputs("harvest", HarvestOutputs).store,
            ctx.folder("train"),
            ctx.out_dir,
            progress=print,
            trust_unverified=bool(ctx.option("trust_unverified")),
        )
    )


def run_probe(
    cfg: ProbeConfig,
    store_url: str,
    train_dir: str,
    out_dir: str,
    progress: Callable[[str], None] | None = None,
    trust_unverified: bool = False,
) -> dict:
    """Run the task probes for the LM of ``store_url`` and the models in ``train_dir``; write
    ``probes.json``, ``probes.md`` and ``probes.png`` into ``out_dir``.  Checkpoints without any
    content digest load only with ``trust_unverified``.

    Returns ``{"files": [paths], "headline": {...}}``.
    """
    from compsae.harvest.ce import harvest_config_from_manifest
    from compsae.lm.models import load_model, resolve_device, stop_layer

    say = progress or (lambda _msg: None)
    store = ActivationStore.open(store_url)
    device = resolve_device(cfg.device)
    notes: list[str] = []
    saes = load_trained(train_dir, device, trust_unverified=trust_unverified)
    if saes:
        hook = saes[0].hook or store.hooks[0]
        other = [s.name for s in saes if s.hook not in ("", hook)]
        if other:
            notes.append(f"models trained on another hook than {hook} left out: {', '.join(other)}")
            saes = [s for s in saes if s.name not in other]
    else:
        hook = store.hooks[0]
        notes.append(
            f"no trained models in {train_dir}: only the PCA / NMF / raw baselines are probed"
        )
    if hook not in store.hooks:
        raise UserError(
            f"the models were trained on hook {hook!r} but the store at {store_url} holds "
            f"{', '.join(store.hooks)}; probe the store they were trained on"
        )

    harvest_cfg = harvest_config_from_manifest(store.manifest, hook).model_copy(
        update={"device": cfg.device}
    )
    say(f"loading {harvest_cfg.model}")
    lm = load_model(harvest_cfg)
    if hook not in lm.hook_names():
        raise UserError(
            f"hook {hook} not found in {harvest_cfg.model} when reloading it for the probes"
        )
    if not harvest_cfg.prepend_bos:
        notes.append("the store was harvested without BOS; the probe prompts start with BOS")

    items: dict[str, list[ProbeItem]] = {
        f: make_items(f, cfg.n_items, cfg.seed) for f in cfg.families
    }
    behaviour: dict[str, dict[str, Any]] = {}
    for f in cfg.families:
        say(f"LM behaviour on {f}")
        b: dict[str, Any] = lm_behaviour(lm, items[f], cfg.batch_size)
        b["p_value"], b["computes"] = lm_computes(b, cfg.lm_alpha)
        behaviour[f] = b
    tasks = probed_tasks(
        list(cfg.families), {f: behaviour[f]["computes"] for f in cfg.families}, cfg.answer_probes
    )
    left_out = [
        f"{f}: {', '.join(sorted(ANSWER_TASKS[f] - set(tasks[f])))}"
        for f in cfg.families
        if ANSWER_TASKS[f] - set(tasks[f])
    ]
    if left_out:
        notes.append(
            "answer tasks not probed because the LM does not compute the answer "
            f"(answer_probes={cfg.answer_probes}): {'; '.join(left_out)}"
        )

    stop = stop_layer([hook])
    acts = {f: decision_activations(lm, hook, items[f], cfg.batch_size, stop) for f in cfg.families}
    del lm  # free the LM before PCA / NMF and the probes

    say("fitting PCA / NMF on store rows")
    splits = [s.split for s in saes if s.split is not None]
    x_fit = fit_sample(store, hook, splits, cfg.fit_rows, harvest_cfg.prepend_bos)
    fits: dict[str, dict[str, Any]] = {}
    maps = _feature_maps(saes, x_fit, cfg, notes, fits)
    line = not_converged_line("nmf", fits.get("nmf"))
    if line is not None:
        say(line)
    ks = tuple(cfg.ks)
    rows = run_probes(
        acts, items, maps, ks=ks, seed=cfg.seed, test_fraction=cfg.test_fraction, tasks=tasks
    )
    for r in rows:
        r["kind"] = "answer" if r["task"] in ANSWER_TASKS[r["family"]] else "input"

    conjunctions = []
    for s in saes:
        if s.has_composition:
            say(f"conjunction test on {s.name}")
            for r in run_conjunctions(
                acts,
                items,
                sae_feature(s, "z"),
                sae_feature(s, "comp"),
                sae_feature(s, "linear"),
                seed=cfg.seed,
                test_fraction=cfg.test_fraction,
            ):
                conjunctions.append({"model": s.name, **r})

    report = {
        "hook": hook,
        "store": store_url,
        "train_dir": train_dir,
        "lm": harvest_cfg.model,
        "config": cfg.model_dump(mode="json"),
        "models": {
            s.name: {
                "type": s.kind,
                "n_latents": s.n_latents,
                "scale": s.scale,
                "composition": s.has_composition,
            }
            for s in saes
        },
        "methods": list(maps),
        "baselines": fits,  # per fitted baseline: converged or not, after how many iterations
        "fit_rows": int(len(x_fit)),
        "notes": notes,
        "behaviour": behaviour,
        "tasks": tasks,
        "probes": rows,
        "summary": summary(rows, list(cfg.families), list(maps), list(ks)),
        "conjunctions": conjunctions,
    }
    report["headline"] = headline(report)
    files = _write(out_dir, report)
    return {"files": files, "headline": report["headline"]}
