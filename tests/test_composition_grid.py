"""The composition grid: a generator whose labels no per-feature score can read, the oracle, the
label-free call rule, and grid records that are reused and resumed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from compsae.analysis.pair_calls import benjamini_hochberg, null_pvalues
from compsae.errors import UserError
from compsae.evaluation.composition_grid import grid as grid_mod
from compsae.evaluation.composition_grid.cell import IDENTIFIABLE_AUC, CellSpec
from compsae.evaluation.composition_grid.design import PairGraphDesign, generate, sample_graph
from compsae.evaluation.composition_grid.statistics import (
    auc,
    best_per_latent_auc,
    residual_pair_tests,
)

DESIGNS = [
    PairGraphDesign(d_model=32, n_features=256),
    PairGraphDesign(d_model=32, n_features=128, degree=3, cofire_prob=0.02),
    PairGraphDesign(d_model=48, n_features=512, degree=1, magnitude_law="constant"),
]


@pytest.mark.parametrize("design", DESIGNS)
def test_interacting_pairs_and_twins_cofire_at_the_same_rate(design: PairGraphDesign) -> None:
    g = sample_graph(design)
    _, a, _ = generate(design, g, 0, 8)
    fire = a > 0
    rate = (fire[:, g.edges[:, 0]] & fire[:, g.edges[:, 1]]).mean(0)
    p, t = rate[g.labels].mean(), rate[~g.labels].mean()
    n = len(fire) * g.labels.sum()
    se = np.sqrt(2 * ((p + t) / 2) * (1 - (p + t) / 2) / n)
    assert abs(p - t) < 4 * se, (p, t, se)
    # every paired feature sits in as many interacting as co-firing-only edges
    deg_p = np.bincount(g.pairs.ravel(), minlength=design.n_features)
    deg_t = np.bincount(g.twins.ravel(), minlength=design.n_features)
    assert (deg_p == deg_t).all() and set(deg_p) <= {0, design.degree}


@pytest.mark.parametrize("design", DESIGNS)
def test_no_per_feature_score_reads_the_labels(design: PairGraphDesign) -> None:
    g = sample_graph(design)
    _, a, _ = generate(design, g, 0, 8)
    fire = a > 0
    per_latent = {
        "rate": fire.mean(0),
        "magnitude": a.sum(0) / np.maximum(fire.sum(0), 1),
        "direction_norm": np.linalg.norm(g.V @ g.A.T, axis=1),
    }
    assert abs(best_per_latent_auc(per_latent, g.edges, g.labels) - 0.5) <= 0.05


def test_the_large_grid_reaches_the_wide_end_of_every_axis() -> None:
    cells = grid_mod.grid_cells("large")
    specs = [c.spec for c in cells]
    assert len(cells) >= 24 and {c.split for c in cells} == {"validation", "test"}
    assert max(s.design.d_model for s in specs) == 512
    assert max(s.design.n_features for s in specs) == 4096
    assert {s.k for s in specs} >= {8, 16, 32} and max(s.n_latents for s in specs) >= 4096
    # the validation and test seeds never share a cell's data
    assert all(s.design.seed in (1, 2) for s in specs)
    # every cell's labels stay unreadable per feature (a smaller draw of the base design)
    g = sample_graph(specs[0].design)
    _, a, _ = generate(specs[0].design, g, 0, 4)
    fire = a > 0
    per_latent = {"rate": fire.mean(0), "magnitude": a.sum(0) / np.maximum(fire.sum(0), 1)}
    assert abs(best_per_latent_auc(per_latent, g.edges, g.labels) - 0.5) <= 0.05


def test_the_shipped_design_is_what_a_per_feature_score_can_read() -> None:
    """The check has teeth: labels that follow one feature's membership are read off at once."""
    design = PairGraphDesign(d_model=32, n_features=256, pair_fraction=0.5, degree=1)
    g = sample_graph(design)
    member = np.zeros(design.n_features)
    member[np.unique(g.pairs)] = 1.0
    member[np.setdiff1d(np.unique(g.twins), np.unique(g.pairs))] = 0.0
    twins_elsewhere = np.setdiff1d(np.arange(design.n_features), np.unique(g.pairs))
    edges = np.concatenate(
        [g.pairs, np.stack([twins_elsewhere[0::2], twins_elsewhere[1::2]], 1)[: len(g.pairs)]]
    )
    labels = np.r_[np.ones(len(g.pairs), bool), np.zeros(len(edges) - len(g.pairs), bool)]
    assert best_per_latent_auc({"member": member}, edges, labels) > 0.95


def test_the_additive_twin_has_no_interaction_energy() -> None:
    design = DESIGNS[0].model_copy(update={"additive": True})
    g = sample_graph(design)
    x, a, inter = generate(design, g, 0, 2)
    assert float(np.abs(inter).max()) == 0.0
    twin = DESIGNS[0]
    x_int, a_int, _ = generate(twin, sample_graph(twin), 0, 2)
    np.testing.assert_array_equal(a, a_int)  # same firing, only the term differs


def test_interaction_strength_is_the_share_of_variance_asked_for() -> None:
    design = DESIGNS[0].model_copy(update={"strength": 0.05})
    g = sample_graph(design)
    x, _, inter = generate(design, g, 20, 4)
    share = (inter**2).sum(1).mean() / ((x - x.mean(0)) ** 2).sum(1).mean()
    assert 0.035 < share < 0.065


def _oracle_auc(design: PairGraphDesign) -> float:
    g = sample_graph(design)
    x, a, _ = generate(design, g, 0, 8)
    tests = residual_pair_tests(a, x - a @ g.V, g.edges)
    return auc(tests.score, g.labels)


def test_the_oracle_identifies_a_small_cell_and_not_one_without_interactions() -> None:
    assert _oracle_auc(DESIGNS[0]) >= IDENTIFIABLE_AUC
    assert _oracle_auc(DESIGNS[0].model_copy(update={"strength": 0.0})) < IDENTIFIABLE_AUC


def test_the_oracle_calls_nothing_on_the_additive_twin() -> None:
    design = DESIGNS[0].model_copy(update={"additive": True})
    g = sample_graph(design)
    x, a, _ = generate(design, g, 0, 8)
    tests = residual_pair_tests(a, x - a @ g.V, g.edges)
    assert benjamini_hochberg(tests.pvalue, 0.05).sum() == 0


def test_benjamini_hochberg_keeps_the_step_up_set() -> None:
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.2, 0.9])
    np.testing.assert_array_equal(
        benjamini_hochberg(p, 0.05), [True, True, False, False, False, False]
    )
    assert not benjamini_hochberg(np.full(10, 0.5), 0.05).any()


def test_null_pvalues_are_uniform_for_draws_of_the_null() -> None:
    rng = np.random.default_rng(0)
    null = 3.0 * rng.chisquare(20, 2000)
    p = null_pvalues(3.0 * rng.chisquare(20, 4000), null)
    assert abs(float((p < 0.05).mean()) - 0.05) < 0.02
    assert null_pvalues(np.array([3.0 * 60]), null)[0] < 1e-4


def _tiny_cells(name: str, composer: dict | None = None) -> list[grid_mod.Cell]:
    base = CellSpec(
        design=PairGraphDesign(d_model=16, n_features=64),
        tokens=4096,
        train_blocks=1,
        heldout_blocks=1,
    )
    return [
        grid_mod.Cell("base", "test", base),
        grid_mod.Cell("k=4", "test", base.model_copy(update={"k": 4})),
    ]


def test_an_unchanged_grid_reuses_every_cell_and_a_killed_one_resumes(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(grid_mod, "grid_cells", _tiny_cells)
    real = grid_mod.run_cell
    calls: list[int] = []

    def dies_on_second(spec, folder, progress=False):
        calls.append(spec.k)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(spec, folder, progress)

    monkeypatch.setattr(grid_mod, "run_cell", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        list(grid_mod.run_grid("tiny", str(tmp_path), progress=False))
    monkeypatch.setattr(grid_mod, "run_cell", real)
    records = list(grid_mod.run_grid("tiny", str(tmp_path), progress=False))
    assert [r["reused"] for r in records] == [True, False]
    again = list(grid_mod.run_grid("tiny", str(tmp_path), progress=False))
    assert all(r["reused"] for r in again)
    with open(os.path.join(str(tmp_path), "test-base", "cell.json")) as f:
        stored = json.load(f)
    assert (
        stored["result"]["scores"]["oracle"]["auc_ci"][0]
        <= stored["result"]["scores"]["oracle"]["auc"]
    )


def test_cells_computed_in_parallel_match_the_sequential_grid_and_are_reused(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(grid_mod, "grid_cells", _tiny_cells)
    par = list(grid_mod.run_grid("tiny", str(tmp_path / "par"), progress=False, jobs=2))
    assert [(r["name"], r["reused"]) for r in par] == [("base", False), ("k=4", False)]
    again = list(grid_mod.run_grid("tiny", str(tmp_path / "par"), progress=False, jobs=2))
    assert all(r["reused"] for r in again)
    assert all(
        r["reused"] for r in grid_mod.run_grid("tiny", str(tmp_path / "par"), progress=False)
    )
    seq = list(grid_mod.run_grid("tiny", str(tmp_path / "seq"), progress=False))
    for p, s in zip(par, seq, strict=True):
        assert p["key"] == s["key"] and p["result"]["n_pairs"] == s["result"]["n_pairs"]
        # the oracle fits the true codes: no training, the same numbers whatever the threads
        assert p["result"]["scores"]["oracle"]["auc"] == pytest.approx(
            s["result"]["scores"]["oracle"]["auc"], abs=1e-9
        )
    with pytest.raises(UserError):
        list(grid_mod.run_grid("tiny", str(tmp_path / "bad"), progress=False, jobs=0))
