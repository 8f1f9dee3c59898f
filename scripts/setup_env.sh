#!/usr/bin/env bash
# Create the virtual environment: torch first (the pinned CPU wheel here; an unpinned torch
# would pull a multi-GB CUDA build), then the project with its test tools.
set -euo pipefail
venv=${1:-.venv}
torch_spec=${2:-torch==2.13.0}
pip_extra=${3:-}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$venv/bin/pip" install -q $pip_extra "$torch_spec"
# saelens / wandb: optional extras, installed here so CI runs the tests that use the real packages
"$venv/bin/pip" install -q -e ".[dev,s3,saelens,wandb]"
"$venv/bin/python" -c "import torch, zarr, transformer_lens; print('environment ready: torch', torch.__version__, 'zarr', zarr.__version__)"
