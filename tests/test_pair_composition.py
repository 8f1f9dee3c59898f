"""The pairwise composition decoder and the intervention-based pair scores built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compsae.analysis.pair_effects import (
    PairEffectSums,
    mixed_differences,
    pair_positions,
    pair_terms,
    typical_code_effects,
)
from compsae.evaluation.ground_truth.config import GroundTruthConfig
from compsae.evaluation.ground_truth.design import generate
from compsae.evaluation.ground_truth.pair_recovery import labelled_auc, thresholded_pairs
from compsae.train.config import make_model_config
from compsae.train.models import build_model
from compsae.train.models.pair_composer import pair_sum, pair_sum_loop

D = 12


def _pair_model(selection: str = "all", **over) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = make_model_config(
        type="compsae",
        composer="pair",
        n_latents=48,
        k=6,
        pair_rank=8,
        pair_selection=selection,
        **over,
    )
    model = build_model(cfg, D).double()
    with torch.no_grad():
        model.pair.E.mul_(10)  # terms well above rounding
        model.pair.W_out.normal_()  # W_out starts at zero; these tests need a path that is on
    return model


def test_closed_form_equals_double_loop():
    u = torch.randn(7, 9, 5, dtype=torch.float64)
    torch.testing.assert_close(pair_sum(u), pair_sum_loop(u), rtol=1e-12, atol=1e-12)


def test_mixed_difference_equals_the_pair_term():
    model = _pair_model()
    x = torch.randn(20, D, dtype=torch.float64) * 3
    _, idx, vals = model.active(x)
    delta = mixed_differences(model, idx, vals)  # four decodes per pair
    terms = pair_terms(model, idx, vals)  # z_i z_j (E_i ⊙ E_j) W_out
    assert terms.abs().max() > 1e-2
    torch.testing.assert_close(delta, terms, rtol=1e-9, atol=1e-9)
    # and the model's composition term is their sum over pairs
    comp = model(x).comp
    torch.testing.assert_close(comp, terms.sum(1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("selection", ["all", "gated", "top_m"])
def test_term_is_zero_with_one_active_latent(selection):
    model = _pair_model(selection)
    idx = torch.arange(6).repeat(4, 1)
    vals = torch.zeros(4, 6, dtype=torch.float64)
    vals[:, 2] = torch.tensor([0.5, 1.0, 2.0, 3.0])  # one firing latent per token
    assert model.pair(idx, vals, m=2).abs().max() == 0
    vals[:, 4] = 1.0  # a second one: now there is a term
    assert model.pair(idx, vals, m=2).abs().max() > 0


def test_top_m_selection_keeps_the_partners_it_chose():
    model = _pair_model("top_m")
    idx = torch.randint(0, 48, (5, 6))
    s = model.pair.pair_weights(idx, m=2)
    assert (
        s is not None
        and torch.equal(s, s.transpose(1, 2))
        and (s.diagonal(dim1=1, dim2=2) == 0).all()
    )
    assert ((s > 0).sum(-1) >= 2).all()  # every latent keeps at least its own top-2
    assert model.pair.pair_weights(idx, m=None) is None  # m = None: all pairs


def test_gradients_reach_every_pair_parameter_and_the_penalty_counts():
    model = _pair_model("top_m", pair_l1=0.5)
    model.set_schedule(m=2, pair_scale=1.0)
    terms = model.loss(
        torch.randn(16, D, dtype=torch.float64) * 3, torch.ones(48, dtype=torch.bool)
    )
    assert terms["pair_l1"] > 0
    assert torch.isclose(
        terms["loss"], terms["recon"] + model.cfg.aux_coef * terms["auxk"] + 0.5 * terms["pair_l1"]
    )
    terms["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_penalty_bounds_the_pair_norms():
    model = _pair_model()
    x = torch.randn(30, D, dtype=torch.float64) * 3
    _, idx, vals = model.active(x)
    norms = pair_terms(model, idx, vals).norm(dim=-1).sum(1).mean()
    assert model.pair.penalties(idx, vals)[0] >= norms - 1e-9


def test_group_penalty_pulls_rows_of_e_and_counts_in_the_loss():
    model = _pair_model(pair_l1=0.0, pair_group_l1=0.3)
    x = torch.randn(30, D, dtype=torch.float64) * 3
    _, idx, vals = model.active(x)
    pen = model.pair.penalties(idx, vals)[1]
    w = model.pair.W_out.norm(dim=-1)
    by_hand = torch.stack(
        [(vals[b, a] * model.pair.E[idx[b, a]] * w).norm() for b in range(30) for a in range(6)]
    )
    assert torch.isclose(pen, by_hand.sum() / 30)
    pen.backward()  # only E is pulled: the weights w are held fixed
    assert model.pair.E.grad.abs().sum() > 0 and model.pair.W_out.grad is None
    with torch.no_grad():
        model.pair.E[idx[0, 0]] = 0.0  # a latent with no pair row adds nothing to it
    assert model.pair.penalties(idx[:1, :1], vals[:1, :1])[1] == 0
    terms = model.loss(x, torch.ones(48, dtype=torch.bool))
    assert torch.isclose(
        terms["loss"],
        terms["recon"] + model.cfg.aux_coef * terms["auxk"] + 0.3 * terms["pair_group_l1"],
    )


def test_residual_fit_trains_the_dictionary_exactly_as_topk():
    """`pair_fit: residual`: the dictionary's gradients are a TopK SAE's with the same weights, and
    the pair parameters get gradient only from what the dictionary leaves."""
    model = _pair_model(pair_l1=0.0, pair_fit="residual")
    topk = build_model(make_model_config(type="topk", n_latents=48, k=6), D).double()
    topk.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("pair.")})
    x = torch.randn(32, D, dtype=torch.float64) * 3
    dead = torch.ones(48, dtype=torch.bool)
    model.loss(x, dead)["loss"].backward()
    topk.loss(x, dead)["loss"].backward()
    for name, p in topk.named_parameters():
        assert torch.allclose(dict(model.named_parameters())[name].grad, p.grad), name
    assert model.pair.W_out.grad.abs().sum() > 0 and model.pair.E.grad.abs().sum() > 0
    with (
        torch.no_grad()
    ):  # the pair term fits the dictionary's residual: the reported recon is the full model's
        out = model(x)
        assert torch.isclose(
            model.loss(x, dead)["recon"].double(), ((out.x_hat - x) ** 2).sum(-1).mean()
        )


def test_typical_code_effects_are_the_two_latent_intervention():
    model = _pair_model()
    codes = torch.rand(48, dtype=torch.float64) * 2
    codes[5] = 0.0  # a latent that never fired has no effect with anyone
    S = typical_code_effects(model, codes, rms=2.0)
    assert (
        S.shape == (48, 48)
        and np.allclose(S, S.T)
        and np.all(np.diag(S) == 0)
        and np.all(S[5] == 0)
    )
    i, j = torch.tensor([3, 7, 40]), torch.tensor([11, 8, 41])
    idx = torch.stack([i, j], 1)
    direct = mixed_differences(model, idx, codes[idx])[:, 0].norm(dim=-1) / 2.0  # four decodes each
    assert np.allclose(S[i.numpy(), j.numpy()], direct.numpy())
    mlp = build_model(
        make_model_config(type="compsae", composer="mlp", n_latents=48, k=6, d_f=8, d_c=8), D
    ).double()
    S_mlp = typical_code_effects(mlp, codes)  # the generic path: four decodes per pair
    assert (
        np.allclose(S_mlp, S_mlp.T)
        and np.isfinite(S_mlp).all()
        and S_mlp[np.triu_indices(48, 1)].max() > 0
    )


def test_pair_scores_invariant_to_batch_order_and_latent_labels():
    model = _pair_model()
    x = torch.randn(40, D, dtype=torch.float64) * 3

    def scores(m, rows):
        out = m(rows)
        idx = out.active_idx
        acc = PairEffectSums.empty(48)
        acc.update(m, rows, out.x_hat, idx, out.z.gather(1, idx))
        return acc.mean_effect(), acc.count

    base, count = scores(model, x)
    perm = torch.randperm(40)
    shuffled, _ = scores(model, x[perm])
    np.testing.assert_allclose(shuffled, base, rtol=1e-9, atol=1e-12)
    # relabel the latents: permute every per-latent parameter the same way
    relabel = torch.randperm(48)
    other = _pair_model()
    with torch.no_grad():
        other.W_enc.copy_(model.W_enc[:, relabel])
        other.b_enc.copy_(model.b_enc[relabel])
        other.W_dec.copy_(model.W_dec[relabel])
        other.b_dec.copy_(model.b_dec)
        other.pair.E.copy_(model.pair.E[relabel])
        other.pair.W_out.copy_(model.pair.W_out)
    moved, _ = scores(other, x)
    inv = relabel.numpy()
    np.testing.assert_allclose(moved, base[np.ix_(inv, inv)], rtol=1e-9, atol=1e-12)
    assert count.sum() > 0


def test_pair_positions_cover_each_pair_once():
    a, b = pair_positions(5)
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [
        (i, j) for i in range(5) for j in range(i + 1, 5)
    ]


def test_labelled_auc_and_threshold_on_a_known_matrix():
    S = np.zeros((6, 6))
    S[0, 1] = S[2, 3] = 1.0  # the two interacting pairs score high; the twin (4, 5) scores 0
    l2t = {i: i for i in range(6)}
    auc, ap = labelled_auc(S, l2t, [(0, 1), (2, 3)], [(4, 5)])
    assert auc == 1.0 and ap == 1.0
    assert labelled_auc(np.zeros((6, 6)), l2t, [(0, 1)], [(4, 5)])[0] == 0.5  # no signal: chance


def test_threshold_chosen_on_validation_pairs_scores_the_test_pairs():
    rng = np.random.default_rng(0)
    n = 24
    interacts = lambda i, j: (i + j) % 3 == 0  # noqa: E731
    S = np.array(
        [[interacts(i, j) + 0.1 * rng.random() for j in range(n)] for i in range(n)], dtype=float
    )
    support = np.full((n, n), 10)
    l2t = {i: i for i in range(n)}
    res = thresholded_pairs(S, support, l2t, interacts, min_support=5)
    assert res.f1 == 1.0 and res.n_found == res.n_true > 0 and res.n_candidates < n * (n - 1) // 2
    # a floor above every score calls nothing: F1 0, nothing found
    none = thresholded_pairs(S, support, l2t, interacts, min_support=5, min_score=5.0)
    assert none.n_found == 0 and none.f1 == 0.0
    # pairs below the support are not candidates
    assert thresholded_pairs(S, np.zeros((n, n)), l2t, interacts).n_candidates == 0


def test_bilinear_ground_truth_is_the_stated_sum_and_twins_cofire_alike():
    cfg = GroundTruthConfig(
        interaction="bilinear",
        d_model=16,
        n_features=64,
        n_rows=20_000,
        n_pairs=4,
        noise_std=0.0,
        group_prob=0.05,
    )
    g = generate(cfg)
    d = g.dictionary
    a = g.acts.toarray()
    # the explicit double sum over firing composing pairs
    proj = d.V @ d.A.T
    row = 7
    on = [i for i in np.flatnonzero(a[row]) if d.composing[i]]
    ref = sum(
        a[row, i] * a[row, j] * (proj[i] * proj[j]) @ d.W_B
        for n, i in enumerate(on)
        for j in on[n + 1 :]
    )
    np.testing.assert_allclose(g.x[row], a[row] @ d.V + (ref if len(on) > 1 else 0), atol=1e-4)
    assert all(d.would_interact(i, j) for i, j in d.C) and not any(
        d.would_interact(i, j) for i, j in d.twins
    )
    both = lambda p: ((a[:, p[0]] > 0) & (a[:, p[1]] > 0)).mean()  # noqa: E731
    rates_c, rates_t = np.array([both(p) for p in d.C]), np.array([both(p) for p in d.twins])
    assert abs(rates_c.mean() - rates_t.mean()) < 0.01
    control = generate(cfg.model_copy(update={"additive_only": True}))
    np.testing.assert_allclose(control.x, a @ d.V, atol=1e-4)
    assert control.dictionary.C == [] and control.dictionary.twins == d.twins


def test_closed_form_norms_and_gains_equal_the_intervention():
    from compsae.analysis.pair_effects import norms_and_gains

    model = _pair_model()
    x = torch.randn(25, D, dtype=torch.float64) * 3
    _, idx, vals = model.active(x)
    resid = torch.randn(25, D, dtype=torch.float64)
    norm, gain = norms_and_gains(model, idx, vals, resid)
    delta = mixed_differences(model, idx, vals).float()
    torch.testing.assert_close(norm, delta.norm(dim=-1), rtol=1e-4, atol=1e-4)
    ref = (resid.float()[:, None] + delta).square().sum(-1) - resid.float().square().sum(-1)[
        :, None
    ]
    torch.testing.assert_close(gain, ref, rtol=1e-3, atol=1e-3)


def test_pair_term_joins_after_the_start_fraction():
    from compsae.train.schedules import pair_on_at, pair_scale_at

    cfg = make_model_config(
        type="compsae",
        composer="pair",
        n_latents=48,
        k=6,
        pair_start_fraction=0.3,
        pair_l1_warmup_fraction=0.5,
    )
    assert not pair_on_at(29, 100, cfg) and pair_on_at(30, 100, cfg)
    assert (
        pair_scale_at(0, 100, cfg) == pytest.approx(1 / 50) and pair_scale_at(60, 100, cfg) == 1.0
    )
    model = _pair_model(pair_l1=0.5)
    x = torch.randn(8, D, dtype=torch.float64) * 3
    model.set_schedule(pair_on=False)
    terms, out = model.compute_loss(x)
    assert out.comp.abs().max() == 0 and "pair_l1" not in terms
    model.reset_schedule()  # evaluation always has the path on
    assert model(x).comp.abs().max() > 0


def test_training_on_tiny_bilinear_data_raises_the_pair_auc(tmp_path):
    """Seeded: a short training of the pairwise CompSAE separates interacting pairs from their
    co-firing-only twins by measured effects, which co-occurrence cannot do."""
    from compsae.evaluation.comparison.table import pmi_matrix
    from compsae.evaluation.ground_truth.matching import hungarian_match
    from compsae.train.config import TrainConfig
    from compsae.train.records import CheckpointMeta
    from compsae.train.trainer import Trainer

    cfg = GroundTruthConfig(
        interaction="bilinear",
        d_model=32,
        n_features=48,
        n_rows=12_288,
        n_pairs=6,
        composing_fraction=0.25,
        interaction_norm=0.4,
        max_prob=0.1,
        zipf_exponent=0.5,
        mean_active=3.0,
        noise_std=0.02,
        group_prob=0.05,
        seed=1,
    )
    g = generate(cfg)
    x = torch.from_numpy(g.x)
    scale = float(np.sqrt(32) / x.norm(dim=1).mean())
    train, held = x[:-4096] * scale, x[-4096:] * scale
    mcfg = make_model_config(
        type="compsae", composer="pair", n_latents=48, k=6, pair_rank=16, pair_l1=0.05, k_start=12
    )
    tcfg = TrainConfig(
        lr=1e-2,
        batch_size=128,
        tokens=128 * 400,
        grad_clip=1.0,
        log_every=10**6,
        checkpoint_every=10**6,
        device="cpu",
    )
    torch.manual_seed(0)
    model = build_model(mcfg, 32)
    trainer = Trainer(
        model,
        mcfg,
        tcfg,
        str(tmp_path / "m"),
        CheckpointMeta.start(mcfg, 32, config_hash="x"),
        progress=False,
    )
    gen = torch.Generator().manual_seed(0)
    trainer.fit(train[torch.randint(0, len(train), (128,), generator=gen)] for _ in range(10**6))
    model.eval()
    with torch.no_grad():
        out = model(held)
    acc = PairEffectSums.empty(48)
    acc.update(model, held, out.x_hat, out.active_idx, out.z.gather(1, out.active_idx))
    l2t = hungarian_match(model.W_dec.detach().numpy(), g.V).latent_to_true(0.5)
    d = g.dictionary
    codes = out.z.sum(0) / (out.z > 0).sum(0).clamp_min(1)
    auc, _ = labelled_auc(typical_code_effects(model, codes, acc.rms), l2t, d.C, d.twins)
    pmi_auc, _ = labelled_auc(
        pmi_matrix(acc.count, (out.z > 0).sum(0).numpy(), len(held), 5), l2t, d.C, d.twins
    )
    assert auc >= 0.8 and auc >= pmi_auc + 0.2, (auc, pmi_auc)


def test_the_polysae_form_is_half_the_square_of_the_summed_embeddings() -> None:
    """`pair_diagonal`: c = ½ (Σ_i z_i E_i)², PolySAE's quadratic term with one shared embedding."""
    import torch

    from compsae.train.models.pair_composer import PairComposer

    torch.manual_seed(0)
    comp = PairComposer(32, 8, 4, diagonal=True)
    torch.nn.init.normal_(comp.W_out)
    idx = torch.randint(0, 32, (5, 6))
    vals = torch.rand(5, 6)
    u = comp.items(idx, vals)
    torch.testing.assert_close(comp(idx, vals), (u.sum(1).square() / 2) @ comp.W_out)


def test_gated_selection_is_all_with_open_gates_and_drops_a_closed_pair():
    gated, plain = _pair_model("gated"), _pair_model("all")
    with torch.no_grad():
        gated.load_state_dict({**plain.state_dict(), "pair.G": torch.full((48, 48), 60.0)})
    x = torch.randn(20, D, dtype=torch.float64) * 3
    _, idx, vals = gated.active(x)
    torch.testing.assert_close(gated(x).comp, plain(x).comp, rtol=1e-9, atol=1e-9)
    # close one co-active pair's gate: its mixed difference vanishes, the others are unchanged
    i, j = int(idx[0, 0]), int(idx[0, 1])
    with torch.no_grad():
        gated.pair.G[i, j] = gated.pair.G[j, i] = -60.0
    delta_g, delta_p = mixed_differences(gated, idx, vals), mixed_differences(plain, idx, vals)
    pa, pb = pair_positions(idx.shape[1])
    closed = ((idx[:, pa] == i) & (idx[:, pb] == j)) | ((idx[:, pa] == j) & (idx[:, pb] == i))
    assert closed.any() and delta_p[closed].norm() > 1e-2
    assert delta_g[closed].abs().max() < 1e-9
    torch.testing.assert_close(delta_g[~closed], delta_p[~closed], rtol=1e-9, atol=1e-9)
    # pair_term carries the gate: the profile and probe features see the closed pair as off
    assert gated.pair.pair_term(torch.tensor([i]), torch.tensor([j])).abs().max() < 1e-9


def test_gate_penalty_pulls_the_co_active_gates_down():
    model = _pair_model("gated", pair_gate_l1=0.1)
    x = torch.randn(16, D, dtype=torch.float64) * 3
    terms = model.loss(x, torch.ones(48, dtype=torch.bool))
    assert terms["pair_gate_l1"] > 0
    assert torch.isclose(
        terms["loss"],
        terms["recon"] + model.cfg.aux_coef * terms["auxk"] + 0.1 * terms["pair_gate_l1"],
    )
    model.zero_grad()
    model.pair.gate_penalty(model.active(x)[1]).backward()
    g = model.pair.G.grad
    _, idx, _ = model.active(x)
    active = torch.zeros(48, dtype=torch.bool)
    active[idx.flatten()] = True
    assert (g[active][:, active].sum() > 0) and g[~active].abs().max() == 0
