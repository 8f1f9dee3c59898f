"""The sparse decoder (gather of the k active W_dec rows) equals the dense product in output and
gradients."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import model_cfg

from compsae.train.models import build_model

SMALL = {"n_latents": 64, "k": 6, "d_f": 16, "d_c": 8, "n_heads": 4, "aux_k": 8}
D = 12


def _loss_and_grads(type: str, composer: str | None, sparse: bool) -> tuple[dict, dict]:
    torch.manual_seed(0)
    over = {**SMALL, **({"composer": composer} if composer else {})}
    model = build_model(model_cfg(type, **over), D)
    model.sparse_decoder = sparse
    torch.manual_seed(1)
    x = torch.randn(20, D)
    dead = torch.zeros(SMALL["n_latents"], dtype=torch.bool)
    dead[::3] = True  # some dead latents so the AuxK term contributes
    terms, _ = model.compute_loss(x, dead)
    terms["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads


@pytest.mark.parametrize(
    ("type", "composer"), [("topk", None), ("compsae", "pair"), ("compsae", "attention")]
)
def test_sparse_and_dense_decoder_agree(type: str, composer: str | None) -> None:
    terms_s, grads_s = _loss_and_grads(type, composer, sparse=True)
    terms_d, grads_d = _loss_and_grads(type, composer, sparse=False)
    for name in terms_s:
        torch.testing.assert_close(terms_s[name], terms_d[name], rtol=1e-5, atol=1e-6)
    assert grads_s.keys() == grads_d.keys() and "W_dec" in grads_s
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-6)


def _curve(sparse: bool, steps: int = 30) -> list[float]:
    torch.manual_seed(0)
    model = build_model(model_cfg("topk", **SMALL), D)
    model.sparse_decoder = sparse
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(2)
    curve = []
    for _ in range(steps):
        x = torch.randn(32, D, generator=gen)
        loss = model.compute_loss(x)[0]["loss"]
        opt.zero_grad()
        loss.backward()
        model.before_optimizer_step()
        opt.step()
        model.after_optimizer_step()
        curve.append(float(loss.detach()))
    return curve


def test_seeded_loss_curve_is_the_same_with_either_decoder() -> None:
    sparse, dense = _curve(True), _curve(False)
    assert sparse[-1] < sparse[0]  # the run learns, so the comparison is not between two flat lines
    torch.testing.assert_close(torch.tensor(sparse), torch.tensor(dense), rtol=1e-4, atol=1e-5)
