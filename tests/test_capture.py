"""Residual hooks captured by plain forward hooks equal the transformer_lens bridge's, bit for
bit."""

from __future__ import annotations

import pytest
import torch

from compsae.harvest.config import HarvestConfig
from compsae.lm.capture import resid_hook
from compsae.lm.models import check_hooks, load_model


@pytest.fixture(scope="module")
def loaded():
    return load_model(HarvestConfig(model="tiny-neox", model_seed=3, device="cpu"))


def test_resid_hook_parsing() -> None:
    assert resid_hook("blocks.12.hook_resid_post") == (12, "post")
    assert resid_hook("blocks.0.hook_resid_pre") == (0, "pre")
    assert resid_hook("blocks.0.hook_resid_mid") is None and resid_hook("hook_embed") is None


@pytest.mark.parametrize(
    "hooks",
    [
        ["blocks.2.hook_resid_post"],
        ["blocks.0.hook_resid_pre", "blocks.3.hook_resid_post", "blocks.1.hook_resid_post"],
        ["blocks.3.hook_resid_pre", "blocks.2.hook_resid_post"],
    ],
)
def test_capture_equals_bridge(loaded, hooks: list[str]) -> None:
    assert loaded.wrapper is None  # nothing so far needed the transformer_lens wrapper
    tokens = torch.randint(1, 257, (3, 33))
    with torch.inference_mode():
        fast = loaded.capture.run(tokens, hooks)
        _, cache = loaded.model.run_with_cache(tokens, names_filter=hooks)
        loaded.wrapper = None  # the next case starts without it again
    for h in hooks:
        assert fast[h].shape == (3, 33, loaded.d_model)
        assert torch.equal(fast[h], cache[h]), h


def test_capture_stops_after_the_deepest_hook(loaded) -> None:
    from compsae.lm.capture import ResidCapture, decoder_layers

    hf = loaded.transformers_model()
    capture = ResidCapture(hf, decoder_layers(hf))
    calls: list[int] = []
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))  # layers that start
        for i, layer in enumerate(capture.layers)
    ]
    try:
        with torch.inference_mode():
            capture.run(torch.randint(1, 257, (1, 8)), ["blocks.1.hook_resid_post"])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]


def test_native_forward_stops_after_the_deepest_hook(
    loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compsae.lm.neox import NeoxResidual

    blocks_run: list[int] = []
    block = NeoxResidual._block

    def counted(self, w, x, n_pos):  # noqa: ANN001, ANN202
        blocks_run.append(next(i for i, b in enumerate(self.blocks) if b is w))
        return block(self, w, x, n_pos)

    monkeypatch.setattr(NeoxResidual, "_block", counted)
    with torch.inference_mode():
        loaded.run_hooks(torch.randint(1, 257, (1, 8)), ["blocks.1.hook_resid_post"], 2)
        assert blocks_run == [0, 1]
        blocks_run.clear()
        out = loaded.run_hooks(
            torch.randint(1, 257, (2, 8)), ["blocks.2.hook_resid_pre", "blocks.0.hook_resid_pre"], 2
        )
    assert blocks_run == [0, 1] and list(out) == [
        "blocks.2.hook_resid_pre",
        "blocks.0.hook_resid_pre",
    ]


def test_dimensions_equal_the_bridge_config(loaded) -> None:
    cfg = loaded.model.cfg
    assert (loaded.n_layers, loaded.d_model, loaded.n_ctx) == (cfg.n_layers, cfg.d_model, cfg.n_ctx)
    loaded.wrapper = None


def test_other_hooks_go_through_the_bridge(loaded) -> None:
    assert not loaded.captures(["blocks.1.mlp.hook_post"])
    assert not loaded.captures(["blocks.9.hook_resid_post"])  # beyond the model: the checks name it
    widths = check_hooks(loaded, ["blocks.1.hook_resid_post"], 16)
    assert widths == {"blocks.1.hook_resid_post": loaded.d_model} and loaded.wrapper is None
    assert check_hooks(loaded, ["blocks.1.mlp.hook_post"], 16) == {
        "blocks.1.mlp.hook_post": 4 * loaded.d_model
    }
    assert loaded.wrapper is not None


def test_llama_layers_are_captured_and_cut() -> None:
    """A Llama-architecture model (SmolLM2's): same hooks, values equal its own hidden states
    (whose last entry is after the final norm, so only inner layers are compared)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compsae.lm.capture import ResidCapture, decoder_layers
    from compsae.lm.models import eager_attention

    torch.manual_seed(0)
    hf = eager_attention(
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=300,
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
            )
        ).eval()
    )
    capture = ResidCapture(hf, decoder_layers(hf))
    calls: list[int] = []
    handles = [
        layer.register_forward_hook(lambda m, a, r, i=i: calls.append(i))
        for i, layer in enumerate(capture.layers)
    ]
    tokens = torch.randint(0, 300, (2, 17))
    with torch.inference_mode():
        got = capture.run(tokens, ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre"])
        for h in handles:
            h.remove()
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    assert calls == [0, 1]
    assert torch.equal(got["blocks.1.hook_resid_pre"], hidden[1])
    assert torch.equal(got["blocks.1.hook_resid_post"], hidden[2])
