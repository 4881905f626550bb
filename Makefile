# Everything installs into .venv/ at the repo root on first use.
# GPU users: make TORCH=torch==2.14.1 (or any torch<=2.14 build for their CUDA).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install train test evaluate relax clean-runs peer-venv

help:
	@echo "make train   - train the demo MACE model (CPU, a few minutes): runs/demo_mace/"
	@echo "make test    - run the test suite"
	@echo "make install - create .venv and install potentials (+dev extras)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) scripts/train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

clean-runs:
	rm -rf runs/ multirun/ outputs/
