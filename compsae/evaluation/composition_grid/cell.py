"""One grid cell: its data and additive twin, the oracle, the trained dictionaries, every score.

Methods scored on the same labelled candidates (interacting edges vs co-firing-only twins):
- ``oracle``: the residual statistic with the true dictionary and true codes (is it identifiable?);
- ``topk_posthoc``: the residual statistic of a trained TopK (the cheap thing a user can do);
- ``compsae``: the shipped pairwise composer's in-context pair effect on held-out rows where both
  latents fire, and its label-free call: a one-sided t-test that the pair's term explains held-out
  residual (``⟨x − x̂ without the term, term direction⟩ > 0``), BH-corrected;
- ``pmi``: co-occurrence of the matched latents (cannot separate the twins by construction).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from compsae.analysis.pair_calls import additive_null_rows, benjamini_hochberg, null_pvalues
from compsae.evaluation.composition_grid.design import (
    PairGraph,
    PairGraphDesign,
    generate,
    sample_graph,
)
from compsae.evaluation.composition_grid.fit import encode_all, fit_dictionary, normalise_scale
from compsae.evaluation.composition_grid.statistics import (
    PairTests,
    auc,
    auc_interval,
    best_per_latent_auc,
    f1,
    label_tuned_f1,
    residual_pair_tests,
)
from compsae.evaluation.ground_truth.matching import hungarian_match
from compsae.train.config import TrainConfig, make_model_config

IDENTIFIABLE_AUC = 0.97  # a cell counts as identifiable when the oracle reaches this
HELDOUT_BLOCK = 10_000  # held-out rows come from blocks the training rows never use


class CellSpec(BaseModel):
    """A grid cell: the design plus the dictionary trained on it and the scoring settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    design: PairGraphDesign = PairGraphDesign()
    dict_ratio: float = Field(1.0, gt=0.0, description="dictionary size / true features")
    k: int = Field(8, ge=1)
    train_blocks: int = Field(16, ge=1, description="4,096-row blocks of training rows")
    heldout_blocks: int = Field(16, ge=1)
    tokens: int = Field(1_048_576, ge=512)
    lr: float = 1e-2
    fdr: float = Field(0.05, gt=0.0, lt=1.0)
    min_support: int = Field(5, ge=1)
    device: Literal["cpu", "auto", "cuda"] = Field("cpu", description="where dictionaries train")
    composer: dict[str, Any] = Field(
        default_factory=dict, description="fields over the shipped composer"
    )

    @property
    def n_latents(self) -> int:
        return max(self.k + 1, int(round(self.dict_ratio * self.design.n_features)))


def _train_cfg(spec: CellSpec) -> TrainConfig:
    return TrainConfig(
        tokens=spec.tokens,
        batch_size=512,
        lr=spec.lr,
        grad_clip=1.0,
        log_every=128,
        checkpoint_every=512,
        device=spec.device,
        seed=spec.design.seed,
    )


def _model_cfgs(spec: CellSpec, d: int) -> dict[str, Any]:
    n, k = spec.n_latents, spec.k
    comp = make_model_config(type="compsae", composer="pair", n_latents=n, k=k, **spec.composer)
    extra = n * comp.pair_rank + comp.pair_rank * d  # E and W_out
    wide = n + int(round(extra / (2 * d + 1)))  # TopK with CompSAE's parameter count
    # PolySAE's form: the quadratic term with its diagonal, one shared embedding, no penalties
    poly = make_model_config(
        type="compsae",
        composer="pair",
        n_latents=n,
        k=k,
        pair_rank=comp.pair_rank,
        pair_diagonal=True,
        pair_l1=0.0,
        pair_group_l1=0.0,
    )
    return {
        "topk": make_model_config(type="topk", n_latents=n, k=k),
        "compsae": comp,
        "topk_params": make_model_config(type="topk", n_latents=wide, k=k),
        "polysae": poly,
    }


def _fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    return float(((x - x_hat) ** 2).sum() / max(((x - x.mean(0)) ** 2).sum(), 1e-30))


def _latent_edges(
    model: Any, g: PairGraph, edges: np.ndarray, min_cos: float = 0.5
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Matched latent ids of each true edge (`[p, 2]`, 0 where unmatched), a mask of edges with both
    members matched to distinct latents, the MCC, and each true feature's latent (-1: none)."""
    match = hungarian_match(model.W_dec.detach().numpy(), g.V)
    to_latent = np.full(g.V.shape[0], -1)
    for latent, true in match.latent_to_true(min_cos).items():
        to_latent[true] = latent
    le = to_latent[edges]
    ok = (le >= 0).all(1) & (le[:, 0] != le[:, 1])
    return np.where(ok[:, None], le, 0), ok, match.mcc, to_latent


def _masked(tests: PairTests, ok: np.ndarray) -> PairTests:
    return PairTests(
        score=np.where(ok, tests.score, 0.0),
        pvalue=np.where(ok, tests.pvalue, 1.0),
        support=np.where(ok, tests.support, 0),
        statistic=np.where(ok, tests.statistic, 0.0),
    )


def composer_pair_tests(
    model: Any, codes: np.ndarray, resid: np.ndarray, pairs: np.ndarray, min_support: int = 5
) -> PairTests:
    """The composer's in-context effect `mean ‖z_i z_j R_ij‖` over rows where both fire, and a
    one-sided t-test of `g = ⟨r + Δ, Δ/‖Δ‖⟩ > 0` (`r = x − x̂`, `Δ` the pair's term) per pair."""
    with torch.no_grad():
        R = model.pair.pair_term(
            torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
        ).numpy()
    norm = np.linalg.norm(R, axis=1)  # [p]
    unit = R / np.maximum(norm, 1e-30)[:, None]
    score, pval, stat = np.zeros(len(pairs)), np.ones(len(pairs)), np.zeros(len(pairs))
    support = np.zeros(len(pairs), dtype=np.int64)
    for lo in range(0, len(pairs), 512):
        sl = slice(lo, lo + 512)
        zi, zj = codes[:, pairs[sl, 0]], codes[:, pairs[sl, 1]]
        zz = zi * zj  # [rows, c]
        both = (zz != 0).astype(np.float64)
        n = both.sum(0)
        g = (resid @ unit[sl].T + zz * norm[sl]) * both  # [rows, c]
        mean = g.sum(0) / np.maximum(n, 1)
        var = ((g - mean) ** 2 * both).sum(0) / np.maximum(n - 1, 1)
        t = mean / np.sqrt(np.maximum(var, 1e-30) / np.maximum(n, 1))
        ok = (n >= min_support) & (norm[sl] > 0)
        score[sl] = np.where(ok, (np.abs(zz) * both).sum(0) / np.maximum(n, 1) * norm[sl], 0.0)
        pval[sl] = np.where(ok, stats.t.sf(t, np.maximum(n - 1, 1)), 1.0)
        support[sl] = n
        stat[sl] = np.where(ok, t, 0.0)
    return PairTests(score=score, pvalue=pval, support=support, statistic=stat)


def pmi_scores(fire: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """PMI of the pairs' co-firing, `log P(i,j) / (P(i) P(j))` (0 where they never co-fire)."""
    p = fire.mean(0)
    both = (fire[:, pairs[:, 0]] & fire[:, pairs[:, 1]]).mean(0)
    with np.errstate(divide="ignore"):
        return np.where(
            both > 0, np.log(both / np.maximum(p[pairs[:, 0]] * p[pairs[:, 1]], 1e-30)), 0.0
        )


def _score_block(tests: PairTests, labels: np.ndarray, fdr: float, seed: int) -> dict[str, Any]:
    called = benjamini_hochberg(tests.pvalue, fdr)
    prec, rec, f = f1(called, labels)
    lo, hi = auc_interval(tests.score, labels, seed=seed)
    return {
        "auc": auc(tests.score, labels),
        "auc_ci": [lo, hi],
        "auc_statistic": auc(tests.statistic, labels),
        "f1": f,
        "precision": prec,
        "recall": rec,
        "f1_label_tuned": label_tuned_f1(tests.score, labels, seed),
        "calls": int(called.sum()),
    }


def _calls_per_1000(tests: PairTests, fdr: float) -> float:
    return 1000.0 * float(benjamini_hochberg(tests.pvalue, fdr).sum()) / max(len(tests.pvalue), 1)


def _data(design: PairGraphDesign, spec: CellSpec) -> tuple[PairGraph, dict[str, np.ndarray]]:
    g = sample_graph(design)
    x_tr, _, _ = generate(design, g, 0, spec.train_blocks)
    x_ho, a_ho, inter_ho = generate(design, g, HELDOUT_BLOCK, spec.heldout_blocks)
    return g, {"train": x_tr, "heldout": x_ho, "a": a_ho, "inter": inter_ho}


def model_pair_tests(
    name: str,
    model: Any,
    x: np.ndarray,
    le: np.ndarray,
    ok: np.ndarray,
    min_support: int,
    seed: int = 0,
) -> tuple[PairTests, dict[str, np.ndarray]]:
    """A trained dictionary's pair tests on held-out rows `x` (normalised units), p-values from the
    additive null of the same dictionary (see `statistics`)."""
    enc = encode_all(model, x)
    resid = x - enc["x_hat"]

    def tests_on(e: dict[str, np.ndarray], r: np.ndarray) -> PairTests:
        if name in ("compsae", "polysae"):
            return composer_pair_tests(model, e["z"], r, le, min_support)
        return residual_pair_tests(e["z"], r, le, min_support)

    observed = tests_on(enc, resid)
    null_x = additive_null_rows(enc["x_hat"] - enc["comp"], resid, seed)
    null_enc = encode_all(model, null_x)
    null = _masked(tests_on(null_enc, null_x - null_enc["x_hat"]), ok)
    observed.pvalue = np.where(
        observed.support >= min_support, null_pvalues(observed.statistic, null.statistic[ok]), 1.0
    )
    return _masked(observed, ok), enc


def _fit_all(
    spec: CellSpec, design: PairGraphDesign, folder: str, progress: bool, names: tuple[str, ...]
) -> dict[str, Any]:
    """Data, oracle and every model of one design (interacting or its additive twin)."""
    g, data = _data(design, spec)
    edges, labels = g.edges, g.labels
    scale = normalise_scale(data["train"])
    xs_tr = (data["train"] * scale).astype(np.float32)
    xs_ho = (data["heldout"] * scale).astype(np.float32)
    total = max(float(((xs_ho - xs_ho.mean(0)) ** 2).sum()), 1e-30)
    res: dict[str, Any] = {"graph": g, "labels": labels, "tests": {}, "fits": {}, "to_latent": {}}
    res["interaction_share"] = float((data["inter"] ** 2).sum() * scale**2) / total
    res["tests"]["oracle"] = residual_pair_tests(
        data["a"], (data["heldout"] - data["a"] @ g.V) * scale, edges, spec.min_support
    )
    fire = data["a"] > 0
    res["pmi"] = pmi_scores(fire, edges)
    res["per_feature"] = {
        "rate": fire.mean(0),
        "magnitude": data["a"].sum(0) / np.maximum(fire.sum(0), 1),
    }
    cfgs = _model_cfgs(spec, design.d_model)
    for name in names:
        model = fit_dictionary(xs_tr, cfgs[name], _train_cfg(spec), f"{folder}/{name}", progress)
        le, ok, mcc, to_latent = _latent_edges(model, g, edges)
        tests, enc = model_pair_tests(name, model, xs_ho, le, ok, spec.min_support)
        res["tests"][name] = tests
        fit = {"fvu": _fvu(xs_ho, enc["x_hat"]), "mcc": mcc, "matched_edges": float(ok.mean())}
        if name in ("compsae", "polysae"):
            fit["fvu_path_off"] = _fvu(xs_ho, enc["x_hat"] - enc["comp"])
            fit["path_share"] = float((enc["comp"] ** 2).sum()) / total
        if name == "compsae":
            with torch.no_grad():
                e_norm = model.pair.E.norm(dim=1).numpy()
            res["per_feature"]["composer_embedding_norm"] = np.where(
                to_latent >= 0, e_norm[to_latent], 0.0
            )
        res["fits"][name] = fit
    return res


METHODS = ("topk", "compsae", "topk_params", "polysae")


def run_cell(spec: CellSpec, folder: str, progress: bool = False) -> dict[str, Any]:
    """Every figure of one cell (the design and its additive twin), training into `folder`."""
    main = _fit_all(spec, spec.design, f"{folder}/models", progress, METHODS)
    labels = main["labels"]
    scores = {
        name: _score_block(t, labels, spec.fdr, spec.design.seed)
        for name, t in main["tests"].items()
    }
    scores["pmi"] = {"auc": auc(main["pmi"], labels)}
    twin = _fit_all(
        spec,
        spec.design.model_copy(update={"additive": True}),
        f"{folder}/additive",
        progress,
        ("topk", "compsae"),
    )
    return {
        "n_latents": spec.n_latents,
        "n_pairs": int(labels.sum()),
        "n_candidates": int(len(labels)),
        "interaction_share": main["interaction_share"],
        "identifiable": bool(scores["oracle"]["auc"] >= IDENTIFIABLE_AUC),
        "best_per_latent_auc": best_per_latent_auc(
            main["per_feature"], main["graph"].edges, labels
        ),
        "scores": scores,
        "fits": main["fits"],
        "additive": {
            "calls_per_1000": {
                name: _calls_per_1000(t, spec.fdr) for name, t in twin["tests"].items()
            },
            "compsae_path_share": twin["fits"]["compsae"]["path_share"],
        },
    }
