#!/usr/bin/env bash
# One command on a CUDA machine (make gpu-check): the kernel and view tests on the GPU
# (compiled kernels, CKD_TEST_DEVICE=cuda), the loss microbenchmark (eager, torch.compile,
# Triton) and the trainer benchmark, all written to one results file. Sized for < 10 min
# on one H100. Works with the pinned torch/triton and with torch 2.11 / triton 3.6 (zarr
# and ffcv are imported only by the trainer benchmark's cached case).
#   scripts/gpu_check.sh [results-file]      (PY=python to use another interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${1:-benchmarks/out/gpu_check_$(date -u +%Y%m%dT%H%M%SZ).md}
mkdir -p "$(dirname "$OUT")"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY (run it on a GPU machine)" >&2
    exit 2
fi
status=0
section() { printf '\n## %s\n\n```\n' "$1" >> "$OUT"; }
endsec() { printf '```\n' >> "$OUT"; }
run() {  # run a step, copy its output into the results file, remember failures
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$OUT"
    local rc=${PIPESTATUS[0]}
    echo "[exit $rc, $((SECONDS - t0)) s] $*" | tee -a "$OUT"
    [ "$rc" -eq 0 ] || status=1
}
{
    echo "# ckd GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    git rev-parse --short HEAD 2>/dev/null
    echo '```'
} > "$OUT"

section "Kernel and view tests on the GPU (CKD_TEST_DEVICE=cuda)"
run env CKD_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_kernels_triton.py tests/test_kernels_budget.py tests/test_kernels_reference.py \
    tests/test_views.py tests/test_views_fused.py tests/test_train_graphs.py
endsec

section "Loss microbenchmark (benchmarks/kernels.py --gpu-check)"
run "$PY" benchmarks/kernels.py --gpu-check --out benchmarks/out
endsec

section "Trainer benchmark (benchmarks/train.py --device cuda --cuda-graphs)"
# nokd, cached classroom, online classroom: each eager and with `ckd train --cuda-graphs`
run "$PY" benchmarks/train.py --device cuda --repeats 3 --steps 20 --batch-size 64 \
    --cases nokd,cache,online --cuda-graphs
endsec
echo "gpu_check: results in $OUT (status $status)"
exit $status
