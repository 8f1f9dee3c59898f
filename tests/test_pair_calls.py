"""The label-free pair calls analyze makes: many calls where the data carry the model's pair terms,
almost none where they are additive, and the Benjamini–Hochberg / null-fit pieces on their own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pair_fixtures import D, N, composer

from compsae.analysis.metrics import add_pair_calls
from compsae.analysis.pair_calls import benjamini_hochberg, call_pairs, null_pvalues, t_statistic
from compsae.analysis.reconstructors import SAEReconstructor


def _rows(model: torch.nn.Module, n: int, true_pairs: set[tuple[int, int]], seed: int):
    """`n` rows with two active latents each (values 1–2) plus noise; a row whose pair is in
    `true_pairs` also carries that pair's term, every other row is additive."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.05, (n, D)).astype(np.float32)
    for t in range(n):
        i, j = sorted(rng.choice(N, 2, replace=False))
        a, b = rng.uniform(1, 2, 2)
        x[t, i] += a
        x[t, j] += b
        if (i, j) in true_pairs:
            with torch.no_grad():
                term = a * b * model.pair.pair_term(torch.tensor([i]), torch.tensor([j]))[0]
            x[t] += term.numpy()
    return x


def _calls(x: np.ndarray, model: torch.nn.Module) -> dict:
    rec = SAEReconstructor("comp", "compsae", N, model=model, batch_rows=512)
    tracked = np.arange(N)
    _, effects, null = rec.reconstruct(x, tracked, N, null_seed=0)
    summary: dict = {"top_pairs": []}
    arrays: dict = {}
    add_pair_calls(summary, arrays, effects, null, tracked, fdr=0.05, min_support=5)
    return {**summary, "matrix": arrays["pair_called"]}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return composer()


def test_pairs_whose_terms_the_data_carry_are_called(model) -> None:
    rng = np.random.default_rng(1)
    all_pairs = [(i, j) for i in range(N) for j in range(i + 1, N)]
    true_pairs = {all_pairs[p] for p in rng.choice(len(all_pairs), 30, replace=False)}
    out = _calls(_rows(model, 6000, true_pairs, seed=2), model)
    called = {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(out["matrix"], 1)), strict=True)}
    assert out["calls"]["candidates"] == len(all_pairs)
    recall = len(called & true_pairs) / len(true_pairs)
    precision = len(called & true_pairs) / max(len(called), 1)
    assert recall >= 0.9, (recall, out["calls"])
    assert precision >= 0.9, (precision, out["calls"])
    assert {(r["i"], r["j"]) for r in out["called_pairs"]} <= called


def test_additive_data_get_almost_no_calls(model) -> None:
    out = _calls(_rows(model, 6000, set(), seed=3), model)
    # FDR 0.05 with no true pair: any call is a false discovery; allow one of 120
    assert out["calls"]["called"] <= 1, out["calls"]


def test_benjamini_hochberg_step_up() -> None:
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    # q = 0.05, m = 10: the largest i with p_(i) <= 0.005 i is i = 2
    assert benjamini_hochberg(p, 0.05).tolist() == [True, True] + [False] * 8
    assert not benjamini_hochberg(np.full(5, 0.5), 0.05).any()
    assert benjamini_hochberg(np.zeros(0), 0.05).shape == (0,)


def test_null_fit_and_t_statistic() -> None:
    rng = np.random.default_rng(0)
    null = rng.chisquare(3, 2000)
    p = null_pvalues(np.array([0.0, 3.0, 30.0]), null)
    assert p[0] == 1.0 and 0.2 < p[1] < 0.6 and p[2] < 1e-4
    assert (null_pvalues(np.array([5.0]), null[:5]) == 1.0).all()  # too few null values
    g = rng.normal(1.0, 1.0, 400)
    t = t_statistic(np.array([g.sum()]), np.array([(g * g).sum()]), np.array([400]))
    assert t[0] == pytest.approx(g.mean() / (g.std(ddof=1) / 20), rel=1e-9)
    calls = call_pairs(np.array([50.0, 50.0]), null, np.array([True, False]), 0.05)
    assert calls.called.tolist() == [True, False] and calls.pvalue[1] == 1.0
