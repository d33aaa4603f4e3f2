# Two entry points for a fresh machine with python3 + pip: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.py

.PHONY: demo test lint install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) scripts/run_experiment.py --config $(CONFIG)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check trackstar scripts tests configs
	$(VENV)/bin/ruff format --check trackstar scripts tests configs

clean:
	rm -rf runs
