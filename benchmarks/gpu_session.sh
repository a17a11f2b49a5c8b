#!/usr/bin/env bash
# Every GPU figure of docs/performance.md, and the GPU tests, in one run of at most 9.5 minutes on
# one H100 or H200. Stages run in order of importance, each under its own time limit, and each
# writes its JSON and log as it goes, so a cut-off run still returns what it measured.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]    # default: $OUT, else benchmarks/out/gpu_session
#
# Needs torch, torchvision, timm, h5py and pandas (the training environment); the GPU tests also
# need pytest: on a machine without it, `pip install --target .device-tools pytest` beforehand
# (on an offline machine: run that where there is network and copy the folder over); the folder
# is put on PYTHONPATH and ignored by git.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/out/gpu_session}}
mkdir -p "$out"
python=${PYTHON:-python}
[ -x .venv/bin/python ] && python=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .device-tools ] && PYTHONPATH="$PYTHONPATH:$PWD/.device-tools"

if ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA device visible to $python: this script measures GPUs (see docs/performance.md for the CPU figures)" >&2
    exit 1
fi

stage() {  # stage NAME SECONDS COMMAND...: run, keep its output in NAME.log, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    local started=$SECONDS
    timeout --kill-after 10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - started)) s"
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nproc
    "$python" -c 'import torch, torchvision, timm; print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__)'
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

if "$python" -c 'import pytest' 2>/dev/null; then
    stage gpu_tests 45 "$python" -m pytest -m gpu -q -p no:cacheprovider tests/test_augment.py
else
    echo "== gpu_tests skipped: pytest is not importable (see the header of this script)"
fi
# Acceptance 1 and 2 at batch 128: ours against the authors' settings, the centroid's cost, then
# the ablations (pretrain_step.py rewrites its JSON after every row).
stage pretrain_step 170 "$python" benchmarks/pretrain_step.py --device cuda --model vit_base \
    --batch-sizes 128 --steps 10 --warmup 3 --out "$out/pretrain_step.json"
# Acceptance 3: the loader against the step rate just measured, at the same batch.
stage loader 80 "$python" benchmarks/loader.py --device cuda --workers 4,8 --batch-size 128 \
    --paths device,workers,unpinned,gpu_decode --batches 10 --warmup 3 --clips 1536 \
    --step-json "$out/pretrain_step.json" --out "$out/loader.json"
stage augment 35 "$python" benchmarks/augment.py --device cuda --batch-sizes 64,128,256 --out "$out/augment.json"
stage jpeg_decode 20 "$python" benchmarks/jpeg_decode.py --device cuda --images 1024 --batch-sizes 64,256 \
    --out "$out/jpeg_decode.json"
# Other batch sizes (256 falls back to gradient checkpointing if it does not fit).
stage pretrain_step_sizes 100 "$python" benchmarks/pretrain_step.py --device cuda --model vit_base \
    --batch-sizes 64,256 --steps 10 --warmup 3 --no-ablations --out "$out/pretrain_step_sizes.json"
# Last: compilation alone takes minutes.
stage pretrain_step_compile 100 "$python" benchmarks/pretrain_step.py --device cuda --model vit_base \
    --batch-sizes 128 --steps 10 --warmup 3 --compile --no-ablations --out "$out/pretrain_step_compile.json"
