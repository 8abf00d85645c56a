# Two commands do all the set-up: `make demo` and `make test` (see README).
PY := .venv/bin/python

.PHONY: setup demo test test-all lint bench gpu-check clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m ckd.cli.main demo --out demo_out

# The layer contracts (pyproject.toml [tool.importlinter]) first, then the default suite.
test: setup
	.venv/bin/lint-imports --no-cache --no-logo
	$(PY) -m pytest -q

# Slow tests too (CI runs this target).
test-all: setup
	$(PY) -m pytest -q -m ""

lint: setup
	.venv/bin/ruff check ckd tests benchmarks scripts
	.venv/bin/lint-imports --no-cache --no-logo

bench: setup
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/cache.py
	$(PY) benchmarks/train.py

# On a CUDA machine: kernel/view/graph/exactness/determinism tests on the GPU (pytest-xdist)
# + kernel and trainer benchmarks, < 10 min, one results file ($OUT/gpu_check.md, else
# under benchmarks/out). Uses .venv if present, else the machine's python3 (e.g. a
# preinstalled CUDA torch) with missing packages from .whl/ (see scripts/gpu_check.sh).
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf .venv demo_out .pytest_cache
