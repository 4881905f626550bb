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

# Peer venv for benchmarks only: mace-torch pins e3nn 0.4.x, so it can never share .venv.
# torch goes in first (the CPU wheel of this machine), then mace-torch with the same torch.
PEER_VENV := peer-venv
PEER_PY := $(PEER_VENV)/bin/python
PEER_TORCH ?= $(TORCH)
PEER_MACE ?= mace-torch==0.3.16
PEER_STAMP := $(PEER_VENV)/.installed

$(PEER_STAMP):
	test -x $(PEER_PY) || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_PY) -m pip install --quiet --upgrade pip
	$(PEER_PY) -m pip install --quiet "$(PEER_TORCH)"
	$(PEER_PY) -m pip install --quiet "$(PEER_MACE)" "$(PEER_TORCH)"
	$(PEER_PY) -c "import mace, e3nn, torch; from mace.modules import ScaleShiftMACE; print('peer-venv: mace-torch', __import__('importlib.metadata').metadata.version('mace-torch'), 'e3nn', e3nn.__version__, 'torch', torch.__version__)"
	touch $(PEER_STAMP)

peer-venv: $(PEER_STAMP)
