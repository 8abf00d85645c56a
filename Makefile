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

# On a CUDA machine: kernel/view tests on the GPU + kernel and trainer benchmarks, one
# results file under benchmarks/out (scripts/gpu_check.sh).
# Uses .venv if present, else the machine's python3 (e.g. a preinstalled CUDA torch).
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf .venv demo_out .pytest_cache
