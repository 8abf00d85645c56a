#!/usr/bin/env bash
# One command on a CUDA machine (make gpu-check): the kernel, view, graph, exactness and
# determinism tests on the GPU (compiled kernels, CKD_TEST_DEVICE=cuda, in parallel with
# pytest-xdist where installed), the loss microbenchmark (eager, torch.compile, Triton, at
# every target case side by side: C=100 and 1000, and C=32000 for kd and classroom) and
# the trainer benchmark (each case eager / --cuda-graphs, each with and without
# --deterministic), all written to ONE results file. Every step has its own time limit and
# the whole check stops within 10 minutes (CKD_GPU_CHECK_BUDGET seconds, default 570).
#
#   scripts/gpu_check.sh [RESULTS_FILE]    default: $OUT/gpu_check.md when $OUT is a folder,
#                                          else benchmarks/out/gpu_check_<UTC time>.md
#   scripts/gpu_check.sh --dry-run         check the set-up and print the steps, run nothing
#   PY=python3 scripts/gpu_check.sh        another interpreter (default: .venv, else python3)
#   CKD_GPU_CHECK_WORKERS=8                pytest-xdist workers (default 8; 0: no xdist)
#
# Works with the pinned torch/triton and with an image's own (torch 2.11 / triton 3.6):
# packages it lacks (zarr and its needs, crc32c) are installed from wheels in .whl/ (in
# the repository root, git-ignored) into a temporary --target folder when .whl/ holds any.
# Prepare .whl/ on a machine with internet, in the repository root (cp312 wheels for an
# x86-64 manylinux image; for another Python, change --python-version):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl zarr==3.1.6 numcodecs==0.16.6 \
#     donfig==0.8.1.post1 crc32c==2.9.post0 google-crc32c==1.9.0
#
# (about 10 MB; ffcv is not needed: no step here reads beton files). Without them the
# tests that need a logit cache are skipped, and the results file says so.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ -n "${1:-}" ]; then
    RESULTS=$1
elif [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
    RESULTS=$OUT/gpu_check.md
else
    RESULTS=benchmarks/out/gpu_check_$(date -u +%Y%m%dT%H%M%SZ).md
fi
BUDGET=${CKD_GPU_CHECK_BUDGET:-570}
WORKERS=${CKD_GPU_CHECK_WORKERS:-8}
DEADLINE=$((SECONDS + BUDGET))
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/ckd-gpu-check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT

unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # --deterministic runs
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# ------------------------------------------------------------------ the steps
# Each: a time limit (s), a title, the command. Tests: the files whose tests run on the
# GPU (their device from tests/device.py, or CUDA when present); CPU-only files (the eager
# reference, the cache's statistics) run in the ordinary suite. The graph and exactness
# tests compare runs bit for bit, with --deterministic on the GPU.
GPU_TESTS=(tests/test_kernels_triton.py tests/test_kernels_budget.py tests/test_kernels_split.py
    tests/test_sparse_triton.py tests/test_views.py tests/test_views_fused.py
    tests/test_train_graphs.py tests/test_train_exactness.py tests/test_determinism.py)
PYTEST_ARGS=(-q -p no:cacheprovider --durations=10)
STEP_LIMITS=(240 210 170)  # the loss benchmark: C=32000 cases too
STEP_TITLES=("Tests on the GPU (CKD_TEST_DEVICE=cuda)"
    "Loss microbenchmark (benchmarks/kernels.py --gpu-check)"
    "Trainer benchmark (benchmarks/train.py --device cuda --cuda-graphs --deterministic)")

step_command() {  # the argv of step $1, one word a line
    case $1 in
        0) printf '%s\n' env CKD_TEST_DEVICE=cuda "$PY" -m pytest "${PYTEST_ARGS[@]}" \
               "${XDIST[@]}" "${GPU_TESTS[@]}" ;;
        1) printf '%s\n' "$PY" benchmarks/kernels.py --gpu-check --out "$SCRATCH/kernels" ;;
        2) printf '%s\n' "$PY" benchmarks/train.py --device cuda --repeats 3 --steps 20 \
               --batch-size 64 --cases nokd,cache,online --cuda-graphs --deterministic ;;
    esac
}

# ------------------------------------------------------------------ set-up
WHEELS=(.whl/*.whl)
SITE=$SCRATCH/site
if [ -e "${WHEELS[0]}" ]; then
    if [ "$DRY" = 1 ]; then
        echo "would install ${#WHEELS[@]} wheels from .whl/ into a temporary --target folder"
    elif "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${WHEELS[@]}"; then
        export PYTHONPATH="$PYTHONPATH:$SITE"  # after the checkout: ckd is the one here
    else
        echo "gpu_check: installing the wheels in .whl/ failed (see above)" >&2
        exit 2
    fi
fi
XDIST=()
if [ "$WORKERS" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "$WORKERS")
fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    PYTEST_ARGS+=(--timeout 200)  # one hung test fails alone instead of the whole step
fi
missing=()
for t in "${GPU_TESTS[@]}"; do [ -f "$t" ] || missing+=("$t"); done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "gpu_check: test files missing: ${missing[*]}" >&2
    exit 2
fi

if [ "$DRY" = 1 ]; then
    echo "results file: $RESULTS"
    echo "budget: ${BUDGET} s; xdist: ${XDIST[*]:-not installed (serial)}"
    for i in "${!STEP_TITLES[@]}"; do
        echo "step $((i + 1)) (limit ${STEP_LIMITS[$i]} s): ${STEP_TITLES[$i]}"
        echo "  $(step_command "$i" | tr '\n' ' ')"
    done
    exit 0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY (run it on a GPU machine)" >&2
    exit 2
fi

mkdir -p "$(dirname "$RESULTS")"
status=0
{
    echo "# ckd GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, 'cuda', torch.version.cuda)"
    "$PY" -c "import zarr; print('zarr', zarr.__version__)" 2>/dev/null ||
        echo "zarr not importable: the tests that build a logit cache are skipped" \
            "(prepare .whl/, see scripts/gpu_check.sh)"
    if commit=$(git rev-parse --short HEAD 2>/dev/null); then
        git diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"
        echo "commit $commit"
    fi
    echo "pytest ${XDIST[*]:-(no xdist: serial)}; budget ${BUDGET} s"
    echo '```'
} > "$RESULTS"

run_step() {  # run step $1 under its limit (capped by what is left of the budget)
    local i=$1 left=$((DEADLINE - SECONDS)) limit=${STEP_LIMITS[$1]} t0=$SECONDS rc
    local -a cmd
    mapfile -t cmd < <(step_command "$i")
    printf '\n## %s\n\n```\n' "${STEP_TITLES[$i]}" >> "$RESULTS"
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "[skipped: ${left} s left of the ${BUDGET} s budget] ${cmd[*]}" | tee -a "$RESULTS"
        rc=124
    else
        timeout -k 10 "$limit" "${cmd[@]}" 2>&1 | tee -a "$RESULTS"
        rc=${PIPESTATUS[0]}
        [ "$rc" -eq 124 ] && echo "[stopped at its ${limit} s limit]" | tee -a "$RESULTS"
        echo "[exit $rc, $((SECONDS - t0)) s] ${cmd[*]}" | tee -a "$RESULTS"
    fi
    printf '```\n' >> "$RESULTS"
    [ "$rc" -eq 0 ] || status=1
}

for i in "${!STEP_TITLES[@]}"; do
    run_step "$i"
    if [ "$i" = 1 ] && [ -f "$SCRATCH/kernels/kernels.csv" ]; then  # into the one file
        printf '\nkernels.csv:\n\n```\n' >> "$RESULTS"
        cat "$SCRATCH/kernels/kernels.csv" >> "$RESULTS"
        printf '```\n' >> "$RESULTS"
    fi
done
printf '\nstatus %s (0: every step passed), %s s in all\n' "$status" "$SECONDS" >> "$RESULTS"
echo "gpu_check: results in $RESULTS (status $status, $SECONDS s)"
exit $status
