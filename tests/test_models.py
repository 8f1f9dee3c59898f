"""The SAE models: exact top-k, CompSAE(composer none) == TopKSAE, gradients, per-token
attention."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from train_fixtures import model_cfg

from compsae.errors import UserError
from compsae.train.config import CompSAEConfig, TrainStageConfig, make_model_config
from compsae.train.models import CompSAE, ReLUSAE, TopKSAE, build_model
from compsae.train.models.base import geometric_median
from compsae.train.models.composer import (
    CompositionNetwork,
    largest_along_keys,
    select_top_keys,
    top_m_mask,
)
from compsae.train.models.topk import topk_codes

SMALL = {
    "n_latents": 64,
    "k": 6,
    "d_f": 16,
    "d_c": 8,
    "n_heads": 4,
    "aux_k": 8,
    "composer": "attention",
}
D = 12


def _model(type: str = "compsae", **over) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_cfg(type, **{**SMALL, **over}), D)


def test_topk_is_exact():
    pre = torch.randn(50, 64)
    idx, vals = topk_codes(pre, 7)
    ref = torch.sort(pre, dim=-1, descending=True).values[:, :7]
    got = torch.gather(pre, 1, idx)
    torch.testing.assert_close(torch.sort(got, dim=-1, descending=True).values, ref, rtol=0, atol=0)
    torch.testing.assert_close(vals, torch.relu(got), rtol=0, atol=0)
    z = TopKSAE(model_cfg("topk", **SMALL), D)(torch.randn(9, D)).z
    assert ((z != 0).sum(-1) <= SMALL["k"]).all() and (z >= 0).all()


def test_composer_none_is_exactly_topk():
    topk = _model(type="topk")
    comp = _model(composer="none")
    comp.load_state_dict(topk.state_dict())  # composer none has exactly TopK's parameters
    x = torch.randn(32, D)
    a, b = topk(x), comp(x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.z, b.z) and b.attn is None
    dead = torch.zeros(SMALL["n_latents"], dtype=torch.bool)
    dead[::3] = True
    la, lb = topk.loss(x, dead), comp.loss(x, dead)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


@pytest.mark.parametrize(
    "composer,gate", [("attention", True), ("attention", False), ("mlp", True)]
)
def test_gradients_reach_every_compsae_parameter(composer, gate):
    model = _model(composer=composer, gate=gate)
    model.set_schedule(m=2)
    dead = torch.ones(
        SMALL["n_latents"], dtype=torch.bool
    )  # AuxK on: encoder rows of dead latents too
    model.loss(torch.randn(16, D) * 3, dead)["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("m", [None, 2])
def test_attention_stays_within_a_token(m):
    model = _model().eval()
    model.set_schedule(m=m)
    x = torch.randn(20, D)
    perm = torch.randperm(20)
    a, b = model(x), model(x[perm])
    torch.testing.assert_close(a.x_hat[perm], b.x_hat)
    torch.testing.assert_close(a.attn[perm], b.attn)
    # a single row alone gives the same output as inside a batch
    torch.testing.assert_close(model(x[3:4]).x_hat, a.x_hat[3:4])


def test_attention_weights_shape_and_top_m():
    model = _model()
    model.set_schedule(m=2)
    out = model(torch.randn(10, D))
    assert out.attn.shape == (10, SMALL["n_heads"], SMALL["k"], SMALL["k"])
    assert out.active_idx.shape == (10, SMALL["k"])
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(10, SMALL["n_heads"], SMALL["k"]))
    assert ((out.attn > 0).sum(-1) <= 2).all()
    assert out.gate.shape == (10, D) and (out.gate >= 0).all() and (out.gate <= 1).all()


def test_top_m_mask_keeps_exactly_m_even_with_ties():
    mask = top_m_mask(torch.zeros(3, 5, 5), 2)
    assert (mask.sum(-1) == 2).all()


def _reference_composer(net: CompositionNetwork, idx, vals, table, m):
    """The composition network as its docstring defines it, term by term (no rewrites)."""
    b, k = idx.shape
    d_f = table.shape[1]
    heads = net.n_heads
    items = vals.unsqueeze(-1) * table[idx]  # [b, k, d_f]
    q, kk, v = net.qkv(items).view(b, k, 3, heads, d_f // heads).permute(2, 0, 3, 1, 4).unbind(0)
    scores = q @ kk.transpose(-1, -2) / (d_f // heads) ** 0.5  # [b, h, query, key]
    if m is not None and m < k:
        scores = scores.masked_fill(~top_m_mask(scores, m), float("-inf"))
    mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, k, d_f)
    h = (items + net.attn_out(mixed)).mean(1)
    return net.to_c(net.ffn(h))


@pytest.mark.parametrize("n,b,m", [(64, 40, 2), (64, 40, None), (500, 6, 3), (500, 6, None)])
def test_fast_composer_equals_its_definition(n, b, m):
    """Table route (b·k > n) and item route, curriculum on and off: output and every gradient."""
    torch.manual_seed(1)
    net = CompositionNetwork(16, 8, 4, 2, "attention").double()
    table = torch.randn(n, 16, dtype=torch.double, requires_grad=True)
    idx = torch.stack([torch.randperm(n)[:6] for _ in range(b)])
    vals = (torch.rand(b, 6, dtype=torch.double) + 0.1).requires_grad_()  # no zero items: no ties
    got = net(idx, vals, table, m=m, need_weights=False)[0]
    want = _reference_composer(net, idx, vals, table, m)
    torch.testing.assert_close(got, want)
    wrt = [table, vals, *net.parameters()]
    for g, w in zip(
        torch.autograd.grad(got.square().sum(), wrt),
        torch.autograd.grad(want.square().sum(), wrt),
        strict=True,
    ):
        torch.testing.assert_close(g, w)
    with_weights = net(idx, vals, table, m=m, need_weights=True)
    torch.testing.assert_close(with_weights[0], want)


def test_top_m_selection_counts_repeats_and_keeps_exactly_m():
    scores = torch.randn(3, 7, 5)
    scores[0, :4, 1] = 2.0  # four keys tie for the top of one query
    best = largest_along_keys(scores, 3)
    ref = torch.sort(scores, dim=-2, descending=True).values[..., :3, :]
    assert torch.equal(torch.stack(best, -2), ref)
    # the CUDA path (torch.topk, no host sync) and the CPU path keep the same values, exactly m keys
    for by_topk in (False, True):
        top, drop = select_top_keys(scores, 3, by_topk=by_topk)
        assert torch.equal(top, ref) and ((~drop).sum(-2) == 3).all()
        assert torch.equal(
            torch.sort(scores.masked_fill(drop, float("-inf")), -2, descending=True).values[
                ..., :3, :
            ],
            ref,
        )
    model = _model()
    model.set_schedule(m=2)
    x = torch.randn(10, D)
    x[:3] = 0.0  # pre-activations 0: every item has z = 0, so all keys tie
    model.loss(x)["loss"].backward()
    assert ((model(x).attn > 0).sum(-1) <= 2).all()


def test_composition_switch_and_training_path_agree():
    model = _model().eval()
    x = torch.randn(8, D)
    on, off = model(x), model(x, composition=False)
    torch.testing.assert_close(off.x_hat + on.comp, on.x_hat)
    model.set_schedule(m=SMALL["k"])  # all partners
    fused = model(x, need_weights=False)
    torch.testing.assert_close(fused.x_hat, model(x).x_hat, rtol=1e-5, atol=1e-5)
    assert fused.attn is None


def test_decoder_stays_unit_norm_and_moves_tangentially():
    model = _model(type="topk")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model.loss(torch.randn(32, D))["loss"].backward()
        model.before_optimizer_step()
        radial = (model.W_dec.grad * model.W_dec.data).sum(-1)
        torch.testing.assert_close(radial, torch.zeros_like(radial), atol=1e-5, rtol=0)
        opt.step()
        model.after_optimizer_step()
        torch.testing.assert_close(model.W_dec.norm(dim=-1), torch.ones(SMALL["n_latents"]))


def test_encoder_initialised_as_decoder_transpose_and_b_dec_from_data():
    model = _model(type="topk")
    assert torch.equal(model.W_enc, model.W_dec.t())
    sample = torch.randn(200, D) + 5
    sample[:3] = 1e4  # a few huge rows (BOS-like) barely move the geometric median
    model.init_b_dec(sample)
    assert (model.b_dec - 5).abs().max() < 0.5
    torch.testing.assert_close(
        geometric_median(torch.tensor([[0.0, 0], [1, 0], [0, 1], [10, 10]]))[0],
        torch.tensor(0.3),
        atol=0.3,
        rtol=0,
    )


def test_relu_l1_scales_with_warmup():
    model = _model(type="relu")
    assert isinstance(model, ReLUSAE)
    x = torch.randn(16, D)
    model.set_schedule(l1_scale=0.0)
    a = model.loss(x)
    assert torch.equal(a["loss"], a["recon"])
    model.set_schedule(l1_scale=1.0)
    b = model.loss(x)
    torch.testing.assert_close(b["loss"], b["recon"] + model.cfg.l1_coef * b["l1"])


def test_bad_model_configs_are_refused():
    with pytest.raises(ValidationError, match="k .* must not exceed n_latents"):
        make_model_config(n_latents=16, k=32)
    with pytest.raises(ValidationError):
        make_model_config(type="gated")
    with pytest.raises(ValidationError, match="models.a"):
        TrainStageConfig(hook="h", n_latents=8, models={"a": make_model_config(n_latents=64, k=16)})
    with pytest.raises(ValidationError, match="unknown training setting"):
        make_model_config(train={"learning_rate": 1.0})
    with pytest.raises(UserError, match="larger than n_latents"):
        build_model(
            CompSAEConfig.model_construct(
                **{**make_model_config().model_dump(), "k": 99, "n_latents": 8}
            ),
            D,
        )


def test_stage_config_overrides():
    cfg = TrainStageConfig(
        hook="h",
        k=8,
        lr=1e-3,
        models={
            "c": make_model_config(type="compsae"),
            "t": make_model_config(type="topk", train={"lr": 5e-4}),
        },
    )
    assert cfg.model_for("c").k == 8 and cfg.model_for("t").k == 8
    assert cfg.train_for("c").lr == 1e-3 and cfg.train_for("t").lr == 5e-4
    assert isinstance(build_model(cfg.model_for("c"), D), CompSAE)
