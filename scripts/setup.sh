#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian/Ubuntu machine: system packages FFCV builds
# against, a .venv with every Python package ckd needs, and ckd itself (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.ckd-setup-v7"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ]; then
  exit 0  # already set up for this pyproject.toml
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# --- system packages (FFCV's C++ extension: libjpeg-turbo + OpenCV core/imgproc) ---
need_apt=0
for pkg in g++ pkg-config libturbojpeg0-dev libopencv-core-dev libopencv-imgproc-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt=1
done
if [ "$need_apt" = 1 ]; then
  echo "[setup] installing system packages (FFCV build deps)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    g++ pkg-config libturbojpeg0-dev libopencv-core-dev libopencv-imgproc-dev >/dev/null
fi

# ffcv's setup.py asks pkg-config for "opencv4" and includes <opencv2/opencv.hpp>; it only
# needs cv::Mat and cv::resize, so a two-line shim over core+imgproc replaces libopencv-dev.
SHIM="$PWD/$VENV/opencv-shim"
mkdir -p "$SHIM/include/opencv2" "$SHIM/pkgconfig"
cat > "$SHIM/include/opencv2/opencv.hpp" <<'HPP'
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
HPP
cat > "$SHIM/pkgconfig/opencv4.pc" <<PC
Name: opencv4
Description: shim over libopencv-core + libopencv-imgproc for ffcv
Version: 4.6.0
Libs: -lopencv_core -lopencv_imgproc
Cflags: -I$SHIM/include -I/usr/include/opencv4
PC

# --- Python packages ---
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip wheel setuptools
# torch pinned in the same command as everything that depends on it (else pip pulls CUDA).
$PIP install -q "torch==2.13.0" "triton>=3.5" "numpy>=2,<3" numba llvmlite \
  opencv-python-headless pillow terminaltables pytorch_pfn_extras fastargs assertpy \
  psutil tqdm rich "zarr>=3" numcodecs crc32c click matplotlib scikit-learn pyyaml \
  pycocotools pytest pytest-timeout pytest-xdist ruff import-linter obstore "moto[s3]" flask flask-cors \
  tensorboard
# timm (mentors named timm:MODEL:FILE) is left out: it imports torchvision, and the only
# torchvision wheels here are CUDA builds that fail to import beside the CPU torch.
# --no-deps: ffcv declares the non-headless opencv-python, which needs libGL.
if ! "$VENV/bin/python" -c "import ffcv.libffcv" >/dev/null 2>&1; then
  echo "[setup] building ffcv"
  # No CPATH here: setuptools then drops the shim's -I and the system opencv.hpp wins.
  PKG_CONFIG_PATH="$SHIM/pkgconfig:${PKG_CONFIG_PATH:-}" \
    $PIP install -q --no-deps --no-build-isolation --no-cache-dir ffcv==1.0.2
fi
$PIP install -q --no-deps -e .
"$VENV/bin/python" -c "import torch, triton, zarr, ffcv, ckd; print('[setup] ok: torch', torch.__version__, 'triton', triton.__version__, 'zarr', zarr.__version__)"
touch "$STAMP"
