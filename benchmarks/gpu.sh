#!/usr/bin/env bash
# GPU checks in one short call, for the few minutes a GPU machine is lent.
#
#   bash benchmarks/gpu.sh prepare   # here (with PyPI): wheels the GPU image lacks -> .whl/ (git-ignored)
#   bash benchmarks/gpu.sh run       # on the GPU machine: install from .whl/ (no network), measure
#
# The GPU image has Python 3.12 on x86-64 with torch (CUDA), numpy, transformers 5.17, safetensors,
# tokenizers, huggingface-hub 1.x, pandas, pyarrow, scikit-learn, scipy, matplotlib, tqdm, pyyaml,
# fsspec, jaxtyping, einops, cloudpickle, toolz, sortedcontainers, xxhash, sentencepiece; `prepare`
# fetches the rest, pinned to the versions of this checkout's .venv, as cp312 / abi3 / pure wheels.
#
# `run` measures on the GPU with in-code random-weight models only (pythia70m-shaped, tiny-neox:
# no hub, no .cache/offline-models): harvest tokens/s against the bare truncated forward, loader
# rows/s against CompSAE and TopK training steps, and that training on CUDA gives the same FVU
# curve as on the CPU.  Each step has its own time limit and a failed step does not stop the
# others.  Everything goes to $OUT/gpu_bench.txt (or ./gpu-results/), RESULT lines at the end.
# The whole run is cut at $GPU_BENCH_BUDGET seconds (default 330; expected 3-4 minutes on one H100
# with 16 cores): give the device call a timeout of at least 420 s.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}

# What the GPU image lacks, plus transformers at this checkout's version and its requirements
# that may be newer than the image's (huggingface-hub 2.x and its httpx2 stack).  Left out:
# wandb (large; transformer_lens imports it only inside its own training loop), accelerate,
# protobuf and transformers-stream-generator (required by transformer-lens, never imported here).
NEEDED="zarr numcodecs crc32c google-crc32c donfig dask distributed tblib zict partd locket msgpack psutil \
tornado click transformer-lens datasets dill multiprocess gguf pydantic pydantic-core annotated-types \
typing-inspection typing-extensions better-abc fancy-einsum beartype typeguard rich markdown-it-py mdurl \
pygments transformers huggingface-hub httpx2 httpcore2 truststore anyio h11 idna"

if [ "$mode" = prepare ]; then
  set -e
  pip_list=$(.venv/bin/pip list --format=freeze 2>/dev/null)
  version_of() {  # the .venv's version of distribution $1 (names compared as PEP 503 normalises them)
    local want
    want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
    echo "$pip_list" | awk -F'==' -v w="$want" '{n=tolower($1); gsub(/[-_.]+/, "-", n); if (n == w) print $2}'
  }
  mkdir -p .whl
  rm -f .whl/*.whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  # manylinux up to 2_28 first (torch's own cu130 wheels need glibc 2.28, so the image has it);
  # a newer glibc tag only where a package has nothing older.
  low="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
--platform manylinux1_x86_64 --platform any"
  high="--platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 $low"
  missing=""
  for p in $NEEDED; do
    v=$(version_of "$p")
    if [ -z "$v" ]; then echo "warning: $p is not in .venv; skipped"; missing="$missing $p"; continue; fi
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $low -d .whl "$p==$v" 2>/dev/null \
      || python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $high -d .whl "$p==$v" \
      || { echo "warning: no cp312 x86-64 wheel for $p==$v"; missing="$missing $p"; }
  done
  ls -1 .whl
  du -sh .whl
  [ -z "$missing" ] || { echo "missing:$missing"; exit 1; }
  exit 0
fi

out=${OUT:-gpu-results}
mkdir -p "$out"
log="$out/gpu_bench.txt"
: > "$log"
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1 \
  TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled PYTHONUNBUFFERED=1
# every step's limit is also cut to what is left of the whole run's budget (seconds)
deadline=$(( $(date +%s) + ${GPU_BENCH_BUDGET:-330} ))

# step NAME SECONDS CMD...: run one step under a time limit, log its exit status, never stop the run
step() {
  local name=$1 limit=$2 t0 rc left cmd
  shift 2
  left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 20 ]; then echo "STEP_FAILED $name skipped: the run's time budget is spent"; return; fi
  [ "$limit" -le "$left" ] || limit=$left
  cmd="$*"
  echo "== $name (limit ${limit}s): ${cmd:0:240}"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@"
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s$([ $rc = 124 ] && echo ' (time limit)')"
  [ $rc = 0 ] || echo "STEP_FAILED $name rc=$rc"
}

{
  date -u +"start %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi -L 2>&1 | head -4
  echo "nproc $(nproc)"
  step install 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  step imports 120 "$PY" -c "
import torch, transformers, transformer_lens, zarr, dask, dask.distributed, datasets, pydantic
import compsae.harvest.run, compsae.train.run
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
print('transformers', transformers.__version__, 'zarr', zarr.__version__, 'dask', dask.__version__,
      'pydantic', pydantic.__version__, 'datasets', datasets.__version__)"
  # most wanted first: a late step is the one the budget cuts.  GPU_STEPS picks a subset.
  wanted() { [ -z "${GPU_STEPS:-}" ] || [[ " $GPU_STEPS " == *" $1 "* ]]; }
  wanted harvest_pythia70m_quick && step harvest_pythia70m_quick 120 "$PY" benchmarks/harvest.py --quick --device cuda
  wanted train_quick && step train_quick 120 "$PY" benchmarks/train.py --quick --steps 10 --device cuda
  wanted fvu_cpu_vs_cuda && step fvu_cpu_vs_cuda 150 "$PY" benchmarks/cuda_vs_cpu.py --steps 100 --devices cpu,cuda
  # a GPU-sized harvest (the quick one is mostly fixed costs on a GPU) and the test model
  wanted harvest_pythia70m_64k && step harvest_pythia70m_64k 90 "$PY" benchmarks/harvest.py --device cuda --tokens 65536 --batch-size 64 --repeats 2
  wanted harvest_tiny_neox_quick && step harvest_tiny_neox_quick 60 "$PY" benchmarks/harvest.py --quick --device cuda --model tiny-neox
  # GPU_PIPELINES="ablations ...": run whole pipelines on the GPU; their outputs (stores and
  # training states left out) come back as $out/pipelines.tar.gz
  for p in ${GPU_PIPELINES:-}; do
    step "pipeline_$p" "${GPU_PIPELINE_LIMIT:-480}" "$PY" -m compsae.cli run --pipeline "$p" --set runs_root=/tmp/gpuruns
  done
  if [ -n "${GPU_PIPELINES:-}" ] && [ -d /tmp/gpuruns ]; then
    tar -C /tmp/gpuruns --exclude=store.zarr --exclude=train_state.safetensors -czf "$out/pipelines.tar.gz" .
  fi
  date -u +"end %Y-%m-%dT%H:%M:%SZ"
} 2>&1 | tee -a "$log"
# RESULT lines tagged with their step (the harvest steps report the same names)
summary=$(awk '/^== [^ ]+ \(limit/ {s = $2} /^RESULT/ {print $0 "  # " s} /^STEP_FAILED/' "$log")
{ echo "== RESULT lines"; echo "$summary"; } | tee -a "$log"
exit 0
