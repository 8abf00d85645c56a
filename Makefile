# Two commands do all the set-up: `make demo` and `make test` (see README).
PY := .venv/bin/python

.PHONY: setup demo test test-all lint bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m ckd.cli.main demo --out demo_out

test: setup
	$(PY) -m pytest -q

# Slow tests too (CI runs this target).
test-all: setup
	$(PY) -m pytest -q -m ""

lint: setup
	.venv/bin/ruff check ckd tests benchmarks

bench: setup
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/cache.py
	$(PY) benchmarks/train.py

clean:
	rm -rf .venv demo_out .pytest_cache
