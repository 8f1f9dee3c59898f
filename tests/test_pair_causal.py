"""The causal pair test's machinery: ablation is exact, the empty ablation is the clean splice,
the matched control matches the tested pairs' effect norms."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import ks_2samp

from compsae.analysis.pair_causal import (
    ablated_x_hat,
    bootstrap_ci,
    matched_pairs,
    pair_mask,
    per_token_delta,
    random_directions_like,
    selection_matrix,
    top_pairs,
)
from compsae.analysis.pair_effects import mixed_differences, pair_positions
from compsae.train.config import make_model_config
from compsae.train.models import build_model

D = 16


def _pair_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = make_model_config(type="compsae", composer="pair", n_latents=48, k=6, pair_rank=8)
    model = build_model(cfg, D).double()
    with torch.no_grad():
        model.pair.E.mul_(10)
        model.pair.W_out.normal_()
    return model


def test_removing_one_pair_subtracts_exactly_its_mixed_difference():
    model = _pair_model()
    x = torch.randn(30, D, dtype=torch.float64) * 3
    _, idx, vals = model.active(x)
    i, j = int(idx[0, 0]), int(idx[0, 1])
    sel = selection_matrix(np.array([[min(i, j), max(i, j)]]), 48)
    full = model.decode_active(idx, vals)
    diff = full - ablated_x_hat(model, idx, vals, sel)
    delta = mixed_differences(model, idx, vals)
    mask = pair_mask(idx, vals, sel)
    assert mask[0].sum() == 1 and delta[0][mask[0]].norm() > 1e-2
    expect = (delta * mask[..., None]).sum(1)
    torch.testing.assert_close(diff, expect, rtol=1e-9, atol=1e-9)
    untouched = ~mask.any(1)
    assert untouched.any()
    assert torch.equal(diff[untouched], torch.zeros_like(diff[untouched]))


def test_removing_zero_pairs_gives_the_clean_splice_bit_for_bit():
    model = _pair_model()
    x = torch.randn(12, D, dtype=torch.float64)
    _, idx, vals = model.active(x)
    empty = selection_matrix(np.zeros((0, 2), dtype=np.int64), 48)
    assert torch.equal(ablated_x_hat(model, idx, vals, empty), model.decode_active(idx, vals))

    lm = torch.nn.Linear(D, 7).double()

    def ce_fn(tokens, replace):  # a toy "LM": logits from the (replaced) activation
        act = x.view(1, 12, D)
        act = act if replace is None else replace(act)
        logits = lm(act)
        ce = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="none")
        return ce[None], logits

    tokens = torch.randint(0, 7, (1, 12))

    def splice(sel):
        return lambda a: ablated_x_hat(model, idx, vals, sel).view_as(a)

    dce, dkl = per_token_delta(ce_fn, tokens, splice(empty), splice(empty))
    assert torch.equal(dce, torch.zeros_like(dce)) and torch.equal(dkl, torch.zeros_like(dkl))
    pa, pb = pair_positions(6)
    some = selection_matrix(np.sort(idx[:, [0, 1]].numpy(), 1), 48)
    dce, dkl = per_token_delta(ce_fn, tokens, splice(empty), splice(some))
    assert dce.abs().max() > 0 and (dkl >= -1e-12).all() and dkl.max() > 0


def test_matched_control_norms_pass_a_two_sample_test_and_are_disjoint():
    rng = np.random.default_rng(0)
    n = 120
    eff = np.triu(rng.lognormal(0, 1, (n, n)), 1)
    count = np.triu(rng.integers(0, 3, (n, n)), 1)
    top = top_pairs(eff, count, 100)
    # a target skewed to strong pairs (as top pairs are) but not an extreme tail, which no
    # disjoint set of pairs could match
    i, j = np.nonzero(count)
    w = eff[i, j]
    pick = rng.choice(len(i), 100, replace=False, p=w / w.sum())
    band = np.stack([i[pick], j[pick]], 1)
    ctl = matched_pairs(eff, count, band, np.random.default_rng(1))
    assert len(ctl) == len(band)
    assert not ({tuple(p) for p in ctl} & {tuple(p) for p in band})
    assert (count[ctl[:, 0], ctl[:, 1]] > 0).all()
    assert ks_2samp(eff[band[:, 0], band[:, 1]], eff[ctl[:, 0], ctl[:, 1]]).pvalue > 0.05
    # and a random draw of co-firing pairs does not match (the test can fail)
    pick = rng.choice(len(i), 100, replace=False)
    assert ks_2samp(eff[band[:, 0], band[:, 1]], eff[i[pick], j[pick]]).pvalue < 0.05
    assert len(top) == 100


def test_random_directions_keep_norms_and_bootstrap_covers_the_mean():
    t = torch.randn(50, D, dtype=torch.float64)
    r = random_directions_like(t, torch.Generator().manual_seed(0))
    torch.testing.assert_close(r.norm(dim=-1), t.norm(dim=-1))
    assert (r - t).abs().max() > 1e-3
    m, lo, hi = bootstrap_ci(np.arange(100.0), np.random.default_rng(0))
    assert lo < m < hi and abs(m - 49.5) < 1e-12


def test_run_pair_causal_gives_top_matched_and_random_rows_per_n():
    from compsae.analysis.pair_causal import run_pair_causal
    from compsae.analysis.pair_effects import PairEffectSums

    model = _pair_model()
    x = torch.randn(2, 10, D, dtype=torch.float64) * 3
    flat = x.flatten(0, 1)
    _, idx, vals = model.active(flat)
    sums = PairEffectSums.empty(48)
    sums.update(model, flat, model.decode_active(idx, vals), idx, vals)
    lm = torch.nn.Linear(D, 7).double()
    tokens = torch.randint(0, 7, (2, 10))

    def ce_fn(tok, replace):  # the own ablations pass a subset of the sequences
        act = x[: len(tok)] if replace is None else replace(x[: len(tok)])
        logits = lm(act)
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), tok[:, 1:].flatten(), reduction="none"
        )
        return ce.view(len(tok), -1), logits

    def encode(a):
        _, i, v = model.active(a)
        return i, v

    recs = run_pair_causal(
        model, ce_fn, tokens, encode, sums.mean_effect(), sums.count, ns=(3, 10**6)
    )
    kinds = [(r.kind, r.n_pairs) for r in recs]
    n_all = int((sums.count > 0).sum())
    assert kinds == [
        ("top", 3),
        ("random_dir", 3),
        ("matched", 3),
        ("top", n_all),
        ("random_dir", n_all),
        ("matched", 0),
    ]
    top3 = recs[0]
    assert (
        top3.n_tokens > 0
        and top3.delta_kl > 0
        and top3.delta_ce_lo <= top3.delta_ce <= top3.delta_ce_hi
    )


def test_plot_pair_causal_writes_a_figure(tmp_path):
    from compsae.analysis.pair_causal import PairCausalRecord, plot_pair_causal

    recs = [
        PairCausalRecord(k, n, 5, 0.1 * n, 0.0, 0.2 * n, 0.01, 0.0, 0.02)
        for k in ("top", "matched", "random_dir")
        for n in (10, 100)
    ]
    plot_pair_causal(recs, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").stat().st_size > 1000


def _toy_lm(x: torch.Tensor, vocab: int = 7):
    """A toy "LM" whose logits at a position depend on the (replaced) activations at it and
    before it, so a sequence's CE does not depend on the other sequences of the batch."""
    torch.manual_seed(1)
    lm = torch.nn.Linear(x.shape[-1], vocab).double()

    def ce_fn(tok, replace):
        act = x[: len(tok)] if replace is None else replace(x[: len(tok)])
        logits = lm(act.cumsum(1))
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), tok[:, 1:].flatten(), reduction="none"
        )
        return ce.view(len(tok), -1), logits

    return ce_fn


def test_one_pairs_own_ablation_equals_the_joint_ablation_of_that_pair_alone():
    from compsae.analysis.pair_causal import own_ablation, run_pair_causal
    from compsae.analysis.pair_effects import PairEffectSums

    model = _pair_model()
    x = torch.randn(4, 10, D, dtype=torch.float64) * 3
    flat = x.flatten(0, 1)
    _, idx, vals = model.active(flat)
    sums = PairEffectSums.empty(48)
    sums.update(model, flat, model.decode_active(idx, vals), idx, vals)
    tokens = torch.randint(0, 7, (4, 10))
    ce_fn = _toy_lm(x)
    # a full-batch ce_fn sees every sequence: the own ablation must splice only the pair's ones
    recs = run_pair_causal(
        model,
        ce_fn,
        tokens,
        lambda a: model.active(a)[1:],
        sums.mean_effect(),
        sums.count,
        ns=(1, 4),
    )
    top1 = next(r for r in recs if r.kind == "top" and r.n_pairs == 1)
    assert top1.pairs_own == 1
    assert abs(top1.pair_delta_ce - top1.delta_ce) < 1e-9
    assert top1.pair_delta_ce_lo == top1.pair_delta_ce == top1.pair_delta_ce_hi
    top4 = next(r for r in recs if r.kind == "top" and r.n_pairs == 4)
    own = [
        own_ablation(model, ce_fn, tokens, idx, vals, model.decode_active(idx, vals), p, 48, 1.0)
        for p in top_pairs(sums.mean_effect(), sums.count, 4)
    ]
    assert top4.pairs_own == 4
    assert abs(top4.pair_delta_ce - float(np.mean(own))) < 1e-9
    assert top4.pair_delta_ce_lo <= top4.pair_delta_ce <= top4.pair_delta_ce_hi
    assert len({round(o, 12) for o in own}) > 1  # the pairs differ: the interval is not a point
    # a pair that never fires has no own effect
    never = np.argwhere(np.triu(sums.count == 0, 1))[0]
    base = model.decode_active(idx, vals)
    assert np.isnan(own_ablation(model, ce_fn, tokens, idx, vals, base, never, 48, 1.0))
    # own_max = 0 switches it off
    off = run_pair_causal(
        model,
        ce_fn,
        tokens,
        lambda a: model.active(a)[1:],
        sums.mean_effect(),
        sums.count,
        ns=(1,),
        own_max=0,
    )
    assert all(r.pairs_own == 0 and np.isnan(r.pair_delta_ce) for r in off)
