# One command each for the two things a new user does first.
#   make quickstart   set up and run the main job on its built-in default
#   make test         set up and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"

.PHONY: setup quickstart test
setup: $(PY)

quickstart: $(PY)
	$(VENV)/bin/jaxdistill train --config configs/smoke.py --workdir workdirs/smoke-$$(date +%Y%m%d-%H%M%S)

test: $(PY)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist loadfile tests
