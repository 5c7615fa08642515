# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build served locally; everything else installs against it.
TORCH_PIN := torch==2.13.0

.PHONY: demo test test-all benchmark-ci env clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install $(TORCH_PIN)
	$(BIN)/pip install -c constraints.txt -e ".[test]"
	touch $@

env: $(VENV)/.installed

demo: env
	$(BIN)/scpeft train

test: env
	$(BIN)/python -m pytest -n 2 --dist loadscope -q

test-all: env
	$(BIN)/python -m pytest -n 2 --dist loadscope -q -m ""

# A CI benchmark gate: a small sweep, then `scpeft report --require` fails the build on a regression.
CI_SWEEP := outputs/ci-benchmark
benchmark-ci: env
	rm -rf $(CI_SWEEP)
	$(BIN)/scpeft train -m peft=head_only,lora seed=0 backbone=scgpt_small trainer.max_epochs=2 \
		evaluation.umap=false hydra.sweep.dir=$(CI_SWEEP)
	$(BIN)/scpeft report $(CI_SWEEP) --require "accuracy>=0.3" --require "trainable_fraction<=0.1" \
		--require "adapter_bytes<=2000000"

clean:
	rm -rf outputs .pytest_cache
