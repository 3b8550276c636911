# The documented entry points: make demo, make test (both set up .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed on machines without an NVIDIA GPU; on a GPU
# machine, install a CUDA torch into .venv first (see README) and it is kept.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint typecheck docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,dev,docs,bench]"
	@touch $(STAMP)

# One torch thread: these small networks gain nothing from more, and lose much on a busy machine.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/pyro-nf train --flow maf --data moons --out outputs/demo/moons-maf --overwrite --no-progress
	OMP_NUM_THREADS=1 $(VENV)/bin/pyro-nf train --flow glow --data digits --out outputs/demo/digits-glow --overwrite --no-progress
	@echo "demo outputs: outputs/demo/moons-maf/ and outputs/demo/digits-glow/ (samples.png, curves.png, metrics.json, train.log)"

# Tests run single-threaded: their networks are tiny, and two threads handing off small ops
# cost far more than they gain (also in the subprocesses the tests start).
test: $(STAMP) lint docs
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -x tests

lint: $(STAMP)
	$(VENV)/bin/ruff check pyro_nf tests examples benchmarks docs
	$(VENV)/bin/ruff format --check pyro_nf tests examples benchmarks docs

typecheck: $(STAMP)
	$(VENV)/bin/mypy pyro_nf

docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

bench: $(STAMP)
	$(PY) benchmarks/run.py --out docs/benchmarks.md

clean:
	rm -rf docs/_build outputs
