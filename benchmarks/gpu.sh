#!/usr/bin/env bash
# GPU checks in one short call, for the few minutes a GPU machine is lent.
#
#   bash benchmarks/gpu.sh prepare   # here (with network): wheels the GPU image lacks -> .whl/ (git-ignored)
#   bash benchmarks/gpu.sh run       # on the GPU machine: install from .whl/ (no network), measure, check
#
# `run` measures on the GPU with the offline models: harvest tokens/s against the bare truncated
# forward, loader rows/s against CompSAE and TopK training rows/s, and that training on CUDA gives
# the same FVU curve shape as on the CPU.  Results go to $OUT (or ./gpu-results) as text.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
PY=${PYTHON:-python3}

# What the GPU image (torch, numpy, pandas, pyarrow, sklearn, matplotlib, transformers... ) lacks.
NEEDED="zarr numcodecs crc32c donfig dask distributed transformer-lens datasets gguf pydantic pydantic-core \
annotated-types typing-inspection fsspec tblib zict partd locket toolz cloudpickle sortedcontainers \
better-abc fancy-einsum beartype typeguard jaxtyping wandb dill multiprocess xxhash"

if [ "$mode" = prepare ]; then
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  # the GPU image runs Python 3.12 on x86-64
  for p in $NEEDED; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "$p" || echo "warning: no wheel for $p"
  done
  du -sh .whl
  exit 0
fi

out=${OUT:-gpu-results}
mkdir -p "$out"
if ! $PY -c "import zarr, dask, transformer_lens" 2>/dev/null; then
  $PY -m pip install -q --no-index --find-links .whl --no-deps .whl/*.whl
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . || $PY -m pip install -q --no-deps -e .
$PY -c "import torch; assert torch.cuda.is_available(); print('GPU:', torch.cuda.get_device_name(0))" | tee "$out/device.txt"
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1
{
  echo "== harvest (tiny-neox and a Pythia-70m-shaped model, CUDA)"
  $PY benchmarks/harvest.py --quick --device cuda
  echo "== train (loader vs CompSAE / TopK training, CUDA)"
  $PY benchmarks/train.py --quick --device cuda
  echo "== FVU curve CPU vs CUDA"
  $PY benchmarks/cuda_vs_cpu.py
} 2>&1 | tee "$out/gpu_bench.txt"
grep '^RESULT' "$out/gpu_bench.txt" || true
