# The two commands of the README. Both set up what they need on a fresh machine.
# An existing torch is used as it is; without one, torch==$(TORCH) is installed
# (override: make test TORCH=2.6.0). The package itself only asks for torch>=2.4.
PY ?= python3
TORCH ?= 2.13.0
ARGS ?=

.PHONY: setup setup-bench test bench

setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"

setup-bench: setup
	$(PY) -m pip install -q -e ".[dev,bench]"

test: setup
	$(PY) -m pytest -q

# 300 steps keep the default run near 13 minutes (10 methods: 13 min 37 s measured from a clean
# clone on 2 CPU cores with set-up, 2026-12-05); 500, the script's default and the README's 3-seed
# results: ARGS="--steps 500")
bench: setup-bench
	$(PY) benchmarks/shootout.py --steps 300 $(ARGS)
