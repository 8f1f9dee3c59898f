"""The residual stream of a GPT-NeoX model (Pythia's architecture) in plain torch.

A short harvest spent most of its start-up importing transformers' model code (about 2.5 s of a
4 s start on 2 cores: the modeling module pulls in `torch.distributed`, FSDP, sympy and dynamo),
for a forward that is a dozen torch calls per block.  This module runs those calls itself over the
weights of a safetensors file and stops after the deepest hook, so a harvest of a GPT-NeoX model
imports torch, `safetensors` and `tokenizers` and nothing of transformers.

The forward repeats transformers' GPT-NeoX forward with eager attention operation for operation
(same kernels, same shapes and strides, same order of additions), so the values are the same bits
as the transformers model's (`tests/test_neox.py` checks them against it); the harvest runs
transformers models with eager attention for the same reason.  Anything outside what is written
here (another activation, rotary scaling, a hook other than a residual one) goes through
transformers as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compsae.errors import UserError
from compsae.lm.capture import resid_hook

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_PREFIX = "gpt_neox."
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)
# per block: (name under gpt_neox.layers.N., kind); the order is transformers' parameter order
_BLOCK_PARAMS = (
    ("input_layernorm.weight", "ln_weight"),
    ("input_layernorm.bias", "bias"),
    ("post_attention_layernorm.weight", "ln_weight"),
    ("post_attention_layernorm.bias", "bias"),
    ("attention.query_key_value.weight", "qkv"),
    ("attention.query_key_value.bias", "bias"),
    ("attention.dense.weight", "dense"),
    ("attention.dense.bias", "bias"),
    ("mlp.dense_h_to_4h.weight", "up"),
    ("mlp.dense_h_to_4h.bias", "bias"),
    ("mlp.dense_4h_to_h.weight", "down"),
    ("mlp.dense_4h_to_h.bias", "bias"),
)


@dataclass(frozen=True)
class NeoxShape:
    """What the forward needs of a GPT-NeoX config."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    n_ctx: int
    rotary_dims: int  # leading dimensions of each head that rotate
    rotary_base: float
    ln_eps: float
    parallel_residual: bool

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NeoxShape | None:
        """The shape of a `config.json`, or None when the model is not a GPT-NeoX this module runs
        (another architecture, activation, rotary scaling or attention without biases)."""
        if config.get("model_type") != "gpt_neox" or config.get("hidden_act", "gelu") != "gelu":
            return None
        rope = dict(config.get("rope_parameters") or {})
        if (rope.get("rope_type") or "default") != "default" or config.get("rope_scaling"):
            return None
        if not config.get("attention_bias", True) or any(k not in config for k in _REQUIRED):
            return None
        d_model, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        # defaults as transformers' GPTNeoXConfig has them (a config.json may leave out default
        # values)
        fraction = float(rope.get("partial_rotary_factor", config.get("rotary_pct", 0.25)))
        return cls(
            vocab_size=int(config["vocab_size"]),
            d_model=d_model,
            n_layers=int(config["num_hidden_layers"]),
            n_heads=n_heads,
            d_mlp=int(config["intermediate_size"]),
            n_ctx=int(config["max_position_embeddings"]),
            rotary_dims=int(d_model // n_heads * fraction),
            rotary_base=float(rope.get("rope_theta", config.get("rotary_emb_base", 10000))),
            ln_eps=float(config.get("layer_norm_eps", 1e-5)),
            parallel_residual=bool(config.get("use_parallel_residual", True)),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> NeoxShape | None:
        """The shape of a Hugging Face folder with `config.json` and `model.safetensors`, or None
        when it holds anything else (transformers loads those)."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            return None
        return cls.from_config(json.loads((folder / CONFIG_FILE).read_text()))

    def parameter_shapes(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, kind) of every parameter of the transformers model, in its order."""
        d, f = self.d_model, self.d_mlp
        shapes = {
            "ln_weight": (d,),
            "qkv": (3 * d, d),
            "dense": (d, d),
            "up": (f, d),
            "down": (d, f),
        }
        bias = {
            "input_layernorm": d,
            "post_attention_layernorm": d,
            "attention.query_key_value": 3 * d,
            "attention.dense": d,
            "mlp.dense_h_to_4h": f,
            "mlp.dense_4h_to_h": d,
        }
        out = [(f"{_PREFIX}embed_in.weight", (self.vocab_size, d), "embedding")]
        for i in range(self.n_layers):
            for name, kind in _BLOCK_PARAMS:
                shape = (bias[name.rsplit(".", 1)[0]],) if kind == "bias" else shapes[kind]
                out.append((f"{_PREFIX}layers.{i}.{name}", shape, kind))
        out += [
            (f"{_PREFIX}final_layer_norm.weight", (d,), "ln_weight"),
            (f"{_PREFIX}final_layer_norm.bias", (d,), "bias"),
            ("lm_head.weight", (self.vocab_size, d), "unembedding"),
        ]  # drawn last: never read here
        return out


def seeded_weights(shape: NeoxShape, seed: int, std: float) -> dict[str, torch.Tensor]:
    """Every parameter of a GPT-NeoX of `shape` drawn from a private generator seeded with `seed`:
    matrices ~ N(0, std), biases 0, LayerNorm weights 1, drawn in transformers' parameter order
    (so equal to `compsae.lm.models.seeded_init` of the transformers model)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    weights = {}
    for name, size, kind in shape.parameter_shapes():
        if kind == "ln_weight":
            weights[name] = torch.ones(size)
        elif kind == "bias":
            weights[name] = torch.zeros(size)
        else:
            weights[name] = torch.empty(size).normal_(0.0, std, generator=gen)
    return weights


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class NeoxResidual:
    """`blocks.N.hook_resid_{pre,post}` of a GPT-NeoX, computed block by block up to the deepest
    hook.

        `weights` are the transformers model's parameters by name
        (`gpt_neox.layers.0.attention.dense.weight`,
        ...); only the embedding and the blocks are kept (the final norm and unembedding are never
        needed for a residual hook)."""

    def __init__(
        self, shape: NeoxShape, weights: dict[str, torch.Tensor], device: torch.device
    ) -> None:
        self.shape, self.device = shape, device

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise ValueError(f"GPT-NeoX weights lack {name}")
            return weights[name].to(device=device, dtype=torch.float32)

        self.embed = take(f"{_PREFIX}embed_in.weight")  # [vocab, d_model]
        self.blocks = [
            {name: take(f"{_PREFIX}layers.{i}.{name}") for name, _ in _BLOCK_PARAMS}
            for i in range(shape.n_layers)
        ]
        dim = shape.rotary_dims
        self.inv_freq = (
            1.0 / (shape.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        ).to(device)
        self._positions: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_folder(
        cls, folder: str | Path, shape: NeoxShape, device: torch.device
    ) -> NeoxResidual | None:
        """The residual stream of the GPT-NeoX in `folder` (`NeoxShape.from_folder` gave `shape`),
        or None when its safetensors file names the weights otherwise."""
        from safetensors import safe_open

        # the embedding and the blocks: a residual hook needs neither the final norm nor the
        # unembedding
        wanted = {
            name: size
            for name, size, _ in shape.parameter_shapes()
            if name.startswith((f"{_PREFIX}embed_in.", f"{_PREFIX}layers."))
        }
        with safe_open(str(Path(folder) / WEIGHTS_FILE), framework="pt") as f:
            if not set(wanted) <= set(f.keys()):
                return None  # another naming (an old checkpoint layout): transformers knows it
            for name, size in wanted.items():
                found = tuple(f.get_slice(name).get_shape())
                if found != size:
                    raise UserError(
                        f"{name} in {folder} is {list(found)} but its config.json asks for "
                        f"{list(size)}; "
                        "the weights and config.json are of different models"
                    )
            weights = {n: f.get_tensor(n) for n in wanted}
        return cls(shape, weights, device)

    def supports(self, hooks: list[str]) -> bool:
        """Whether every hook is a residual hook of a block this model has."""
        parsed = [resid_hook(h) for h in hooks]
        return all(p is not None and p[0] < self.shape.n_layers for p in parsed)

    def _position_terms(self, n_pos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos, sin) `[1, 1, pos, rotary_dims]` and the additive causal mask `[1, 1, pos, pos]`."""
        if n_pos not in self._positions:
            positions = torch.arange(n_pos, device=self.device)[None]  # [1, pos]
            freqs = positions[..., None].float() * self.inv_freq  # [1, pos, rotary_dims / 2]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[:, None], emb.sin()[:, None]
            above = torch.ones(n_pos, n_pos, dtype=torch.bool, device=self.device).triu(1)
            mask = torch.zeros(n_pos, n_pos, device=self.device).masked_fill(
                above, torch.finfo(torch.float32).min
            )
            self._positions[n_pos] = (cos, sin, mask[None, None])
        return self._positions[n_pos]

    def _attention(self, w: dict[str, torch.Tensor], h: torch.Tensor, n_pos: int) -> torch.Tensor:
        """Causal self-attention of `h: [batch, pos, d_model]` (already normalised)."""
        s = self.shape
        batch = h.shape[0]
        qkv = F.linear(
            h, w["attention.query_key_value.weight"], w["attention.query_key_value.bias"]
        )
        qkv = qkv.view(batch, n_pos, s.n_heads, 3 * s.d_head).transpose(
            1, 2
        )  # [batch, heads, pos, 3 d_head]
        q, k, v = qkv.chunk(3, dim=-1)
        cos, sin, mask = self._position_terms(n_pos)
        r = s.rotary_dims
        q = torch.cat([q[..., :r] * cos + _rotate_half(q[..., :r]) * sin, q[..., r:]], dim=-1)
        k = torch.cat([k[..., :r] * cos + _rotate_half(k[..., :r]) * sin, k[..., r:]], dim=-1)
        scores = (
            torch.matmul(q, k.transpose(2, 3)) * (s.d_head**-0.5) + mask
        )  # [batch, heads, pos, pos]
        pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        z = torch.matmul(pattern, v).transpose(1, 2).contiguous()  # [batch, pos, heads, d_head]
        return F.linear(
            z.view(batch, n_pos, -1), w["attention.dense.weight"], w["attention.dense.bias"]
        )

    def _mlp(self, w: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(h, w["mlp.dense_h_to_4h.weight"], w["mlp.dense_h_to_4h.bias"]))
        return F.linear(h, w["mlp.dense_4h_to_h.weight"], w["mlp.dense_4h_to_h.bias"])

    def _block(self, w: dict[str, torch.Tensor], x: torch.Tensor, n_pos: int) -> torch.Tensor:
        eps, d = self.shape.ln_eps, (self.shape.d_model,)
        attn = self._attention(
            w,
            F.layer_norm(x, d, w["input_layernorm.weight"], w["input_layernorm.bias"], eps),
            n_pos,
        )
        if self.shape.parallel_residual:
            mlp = self._mlp(
                w,
                F.layer_norm(
                    x,
                    d,
                    w["post_attention_layernorm.weight"],
                    w["post_attention_layernorm.bias"],
                    eps,
                ),
            )
            return mlp + attn + x
        attn = attn + x
        mlp = self._mlp(
            w,
            F.layer_norm(
                attn,
                d,
                w["post_attention_layernorm.weight"],
                w["post_attention_layernorm.bias"],
                eps,
            ),
        )
        return mlp + attn

    def run(self, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        """`{hook: [batch, pos, d_model]}` for `tokens: [batch, pos]`; blocks after the deepest hook
        never run."""
        wanted = {h: resid_hook(h) for h in hooks}
        last = max(layer + (kind == "post") for layer, kind in wanted.values())  # type: ignore[misc]
        n_pos = tokens.shape[1]
        x = F.embedding(tokens, self.embed)  # [batch, pos, d_model]
        out: dict[str, torch.Tensor] = {}
        for i in range(last):
            for h, (layer, kind) in wanted.items():  # type: ignore[misc]
                if layer == i and kind == "pre":
                    out[h] = x
            x = self._block(self.blocks[i], x, n_pos)
            for h, (layer, kind) in wanted.items():  # type: ignore[misc]
                if layer == i and kind == "post":
                    out[h] = x
        for h, (layer, kind) in wanted.items():  # a pre hook of the block after the last one run
            if h not in out and layer == last and kind == "pre":
                out[h] = x
        return {h: out[h] for h in hooks}
