# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first (once).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test demo-model

setup: $(VENV)/.installed

# torch first: on CPU machines pip resolves torch==2.13.0 to the local CPU wheel; never pull torchvision.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[train,eval,test,serve]"
	@if $(BIN)/python -m pip list 2>/dev/null | grep -iE '^(torchvision|nvidia-)'; then \
		echo "set-up pulled torchvision or CUDA packages (above); see setup.cfg" >&2; exit 1; fi
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/ergo demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# Rebuild the shipped demo model from nothing (data, SFT, GRPO, evaluation): about 30 minutes on 2 CPU cores.
demo-model: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m training.synthetic_recipe runs/synthetic --ship
