"""compsae's GPT-NeoX residual forward: the same weights and the same bits as transformers' eager
forward, used for GPT-NeoX folders and tiny-neox, and a harvest that never imports transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compsae.harvest.config import HarvestConfig
from compsae.lm.capture import ResidCapture, decoder_layers
from compsae.lm.models import (
    TINY_NEOX_STD,
    check_hooks,
    eager_attention,
    load_model,
    seeded_init,
    tiny_neox_config,
    tiny_neox_hf,
)
from compsae.lm.neox import NeoxResidual, NeoxShape, seeded_weights

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [
    "blocks.0.hook_resid_pre",
    "blocks.2.hook_resid_post",
    "blocks.1.hook_resid_post",
    "blocks.3.hook_resid_pre",
]


def transformers_twin(config: dict, seed: int):  # noqa: ANN201 - a transformers GPTNeoXForCausalLM
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    fields = {k: v for k, v in config.items() if k != "model_type"}
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**fields))
    seeded_init(model, seed, TINY_NEOX_STD)
    return eager_attention(model.eval())


def test_seeded_weights_equal_the_transformers_init() -> None:
    hf = tiny_neox_hf(5, 300).state_dict()
    shape = NeoxShape.from_config(tiny_neox_config(300))
    ours = seeded_weights(shape, 5, TINY_NEOX_STD)
    assert set(ours) == set(hf)
    for name, value in ours.items():
        assert torch.equal(value, hf[name]), name


DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() else []
)  # benchmarks/gpu.sh runs this file on a GPU


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("parallel", [True, False])
def test_forward_is_bit_equal_to_transformers_eager(parallel: bool, device: str) -> None:
    config = {
        **tiny_neox_config(300, d_model=48, n_layers=4, n_heads=3),
        "use_parallel_residual": parallel,
    }
    hf = transformers_twin(config, seed=2).to(device)
    shape = NeoxShape.from_config(config)
    ours = NeoxResidual(shape, seeded_weights(shape, 2, TINY_NEOX_STD), torch.device(device))
    theirs = ResidCapture(hf, decoder_layers(hf))
    assert shape.rotary_dims == 4 and shape.parallel_residual is parallel
    for batch, n_pos in ((1, 1), (1, 7), (3, 33), (2, 128)):
        tokens = torch.randint(
            0, 300, (batch, n_pos), generator=torch.Generator().manual_seed(n_pos)
        ).to(device)
        with torch.inference_mode():
            a, b = ours.run(tokens, HOOKS), theirs.run(tokens, HOOKS)
        for h in HOOKS:
            assert a[h].shape == (batch, n_pos, 48)
            assert torch.equal(a[h], b[h]), (h, batch, n_pos, (a[h] - b[h]).abs().max().item())


def test_unsupported_models_are_left_to_transformers(tmp_path: Path) -> None:
    base = tiny_neox_config(300)
    assert NeoxShape.from_config(base) is not None
    assert NeoxShape.from_config({**base, "model_type": "llama"}) is None
    assert NeoxShape.from_config({**base, "hidden_act": "relu"}) is None
    assert (
        NeoxShape.from_config({**base, "rope_scaling": {"type": "linear", "factor": 2.0}}) is None
    )
    assert (
        NeoxShape.from_config({**base, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})
        is None
    )
    assert NeoxShape.from_config({**base, "attention_bias": False}) is None
    assert (
        NeoxShape.from_config({k: v for k, v in base.items() if k != "intermediate_size"}) is None
    )
    # values a config.json may leave out are transformers' GPT-NeoX defaults
    sparse = NeoxShape.from_config(
        {k: v for k, v in base.items() if k not in ("rotary_pct", "use_parallel_residual")}
    )
    assert sparse == NeoxShape.from_config(base) and sparse.rotary_dims == 4
    (tmp_path / "config.json").write_text(json.dumps(base))
    assert (
        NeoxShape.from_folder(tmp_path) is None
    )  # no model.safetensors (a pickled checkpoint: transformers)


@pytest.fixture(scope="module")
def neox_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Pythia-shaped model folder as `save_pretrained` writes it, with a tokenizer.json."""
    from compsae.lm.byte_tokenizer import VOCAB_SIZE, byte_tokenizer

    folder = tmp_path_factory.mktemp("neox")
    tiny_neox_hf(7, VOCAB_SIZE).save_pretrained(folder)
    byte_tokenizer().to_transformers().save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    return folder


def test_a_gpt_neox_folder_runs_on_the_native_forward(neox_folder: Path) -> None:
    loaded = load_model(HarvestConfig(model=str(neox_folder), device="cpu"))
    assert isinstance(loaded.capture, NeoxResidual) and "compsae gpt_neox" in loaded.info["forward"]
    assert loaded.hf_model is None  # nothing loaded through transformers so far
    assert (loaded.n_layers, loaded.d_model, loaded.n_heads, loaded.bos_token_id) == (4, 64, 4, 0)
    tokens = torch.randint(1, 257, (2, 40))
    with torch.inference_mode():
        ours = loaded.run_hooks(tokens, HOOKS, 4)
        hf = loaded.transformers_model()
        theirs = ResidCapture(hf, decoder_layers(hf)).run(tokens, HOOKS)
    for h in HOOKS:
        assert torch.equal(ours[h], theirs[h]), h
    # a hook outside the residual stream still goes through transformer_lens, over the same weights
    assert check_hooks(loaded, ["blocks.1.mlp.hook_post"], 16) == {"blocks.1.mlp.hook_post": 256}


def test_a_folder_with_other_weight_names_is_read_by_transformers(
    neox_folder: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((neox_folder / name).read_bytes())
    weights = load_file(str(neox_folder / "model.safetensors"))
    save_file(
        {k.replace("gpt_neox.", "model."): v for k, v in weights.items()},
        str(tmp_path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    shape = NeoxShape.from_folder(tmp_path)
    assert (
        shape is not None and NeoxResidual.from_folder(tmp_path, shape, torch.device("cpu")) is None
    )


def test_weights_of_another_shape_are_one_line(neox_folder: Path, tmp_path: Path) -> None:
    from compsae.errors import UserError

    for f in neox_folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((neox_folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(
        UserError,
        match=r"mlp.dense_h_to_4h.weight in .* is \[256, 64\] but its config.json asks "
        r"for \[128, 64\]",
    ):
        load_model(HarvestConfig(model=str(tmp_path), device="cpu"))


def _subprocess_env() -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH (kept: the GPU machine
    finds its extra packages there)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TQDM_DISABLE": "1"}


def test_a_harvest_of_tiny_neox_and_of_a_neox_folder_imports_no_transformers(
    neox_folder: Path, tmp_path: Path
) -> None:
    """Importing transformers' model code was most of a short harvest's start-up."""
    code = (
        "import sys\n"
        "from compsae.harvest.config import HarvestConfig\n"
        "from compsae.harvest.run import run_harvest\n"
        "for i, model in enumerate(sys.argv[2:]):\n"
        "    cfg = HarvestConfig(model=model, hooks=['blocks.1.hook_resid_post'], context=16, "
        "n_tokens=256,\n"
        "                        batch_size=4, chunk_rows=64, shard_rows=128, data={'source': "
        "'synthetic:mixed'})\n"
        "    run_harvest(cfg, sys.argv[1] + f'/run{i}')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', "
        "'transformer_lens')))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), "tiny-neox", str(neox_folder)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_subprocess_env(),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout[-1000:]


REVISION = "a" * 40


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache (nothing is fetched: the hub is never reached)."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_snapshot(cache: Path, repo: str, files: list[Path]) -> Path:
    """Put `files` in `cache` as the hub's `main` revision of `repo`."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for f in files:
        (snapshot / f.name).write_bytes(f.read_bytes())
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(REVISION)
    return snapshot


def test_pythia_names() -> None:
    from compsae.lm.models import _PYTHIA

    for name in (
        "pythia-70m-deduped",
        "EleutherAI/pythia-1.4b",
        "pythia-160m-v0",
        "pythia-12b-deduped-v0",
    ):
        assert _PYTHIA.match(name), name
    for name in ("gpt2", "pythia", "EleutherAI/gpt-neox-20b", "someone/pythia-70m"):
        assert not _PYTHIA.match(name), name


def test_a_pythia_name_runs_its_hub_snapshot_on_the_native_forward(
    neox_folder: Path, hub_cache: Path
) -> None:
    cache_snapshot(
        hub_cache,
        "EleutherAI/pythia-70m-deduped",
        sorted(p for p in neox_folder.iterdir() if p.is_file()),
    )
    loaded = load_model(HarvestConfig(model="pythia-70m-deduped", device="cpu"))
    assert isinstance(loaded.capture, NeoxResidual) and loaded.hf_model is None
    assert loaded.info["name"] == "pythia-70m-deduped" and REVISION in loaded.info["source"]
    folder = load_model(HarvestConfig(model=str(neox_folder), device="cpu"))
    tokens = torch.randint(1, 257, (2, 16))
    with torch.inference_mode():
        assert torch.equal(
            loaded.run_hooks(tokens, ["blocks.2.hook_resid_post"], 3)["blocks.2.hook_resid_post"],
            folder.run_hooks(tokens, ["blocks.2.hook_resid_post"], 3)["blocks.2.hook_resid_post"],
        )


def test_a_pythia_snapshot_without_safetensors_is_left_to_transformer_lens(
    neox_folder: Path, hub_cache: Path
) -> None:
    from compsae.lm.models import pythia_snapshot

    cache_snapshot(
        hub_cache,
        "EleutherAI/pythia-70m",
        [neox_folder / "config.json", neox_folder / "tokenizer.json"],
    )
    assert pythia_snapshot(HarvestConfig(model="pythia-70m")) is None
    assert pythia_snapshot(HarvestConfig(model="pythia-70m", weight_processing=True)) is None


def test_an_unreachable_hub_is_one_line(hub_cache: Path) -> None:
    from compsae.errors import UserError

    with pytest.raises(
        UserError,
        match=r"^cannot load pythia-410m from the Hugging Face hub \(.*\); without the hub",
    ):
        load_model(HarvestConfig(model="pythia-410m", device="cpu"))
