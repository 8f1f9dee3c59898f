"""Residual-stream hooks of a Hugging Face causal LM captured by plain PyTorch forward hooks.

transformer_lens' `TransformerBridge.run_with_cache` wraps every sub-module of the model in a hook
point, so each forward pays Python for hundreds of modules; on a GPU, where one block of a
Pythia-70m-sized model is a few microseconds of kernels, that bookkeeping is what the harvest
waited on (the hooked forward ran at 0.66 of the bare one on an H100).  Building the bridge also
costs seconds of start-up (importing transformer_lens, wrapping the modules).

For the hooks most harvests ask for — `blocks.N.hook_resid_pre` and `blocks.N.hook_resid_post`,
the input and output of decoder layer N — one forward (pre-)hook on that layer is enough: it keeps
a reference to the layer's input or output (no copy) and, after the deepest hook, stops the
forward by raising `_Truncate`, so blocks after it never run.  The values are the bridge's own
(the bridge runs the same Hugging Face modules; `tests/test_capture.py` checks they are equal
bit for bit).  Any other hook goes through the bridge.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import torch

_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


class _Truncate(Exception):
    """Raised by the last hook: the blocks after it are not needed."""


def resid_hook(hook: str) -> tuple[int, str] | None:
    """`blocks.3.hook_resid_post` → (3, "post"); None for any other hook."""
    m = _RESID.match(hook)
    return (int(m.group(1)), m.group(2)) if m else None


def decoder_layers(hf_model: Any) -> torch.nn.ModuleList | None:
    """The decoder layers of a transformers causal LM (`base_model.layers`: GPT-NeoX, Llama,
    Mistral, Qwen, ...), or None when the model keeps them elsewhere."""
    layers = getattr(getattr(hf_model, "base_model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0 else None


class ResidCapture:
    """Captures `blocks.N.hook_resid_{pre,post}` of a transformers model by forward hooks."""

    def __init__(self, hf_model: Any, layers: torch.nn.ModuleList) -> None:
        self.base = hf_model.base_model  # the model without its LM head: logits are never needed
        self.layers = layers

    def supports(self, hooks: list[str]) -> bool:
        """Whether every hook is a residual hook of a layer this model has."""
        parsed = [resid_hook(h) for h in hooks]
        return all(p is not None and p[0] < len(self.layers) for p in parsed)

    def run(self, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        """`{hook: [batch, pos, d_model]}` for `tokens: [batch, pos]`, on the model's device; the
        forward stops after the deepest hook."""
        wanted = {h: resid_hook(h) for h in hooks}
        # the forward ends at the last hook to fire: the deepest layer, its output if asked for
        last = max(wanted.values(), key=lambda p: (p[0], p[1] == "post"))  # type: ignore[arg-type,return-value]
        out: dict[str, torch.Tensor] = {}
        handles = []

        def keep(hook: str, value: torch.Tensor, is_last: bool) -> None:
            out[hook] = value
            if is_last and len(out) == len(wanted):
                raise _Truncate

        try:
            for hook, (layer, kind) in wanted.items():  # type: ignore[misc]
                is_last = (layer, kind) == last
                module = self.layers[layer]
                if kind == "pre":

                    def pre(
                        _m: Any,
                        args: tuple,
                        kwargs: dict,
                        hook: str = hook,
                        is_last: bool = is_last,
                    ) -> None:
                        keep(hook, args[0] if args else kwargs["hidden_states"], is_last)

                    handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                else:

                    def post(
                        _m: Any,
                        _args: tuple,
                        result: Any,
                        hook: str = hook,
                        is_last: bool = is_last,
                    ) -> None:
                        keep(hook, result[0] if isinstance(result, tuple) else result, is_last)

                    handles.append(module.register_forward_hook(post))
            with contextlib.suppress(_Truncate):
                self.base(input_ids=tokens)
        finally:
            for handle in handles:
                handle.remove()
        missing = [h for h in hooks if h not in out]
        if missing:  # a model whose forward skips a layer: never silently store nothing
            raise RuntimeError(f"hooks {missing} did not fire during the forward pass")
        return {h: out[h] for h in hooks}
