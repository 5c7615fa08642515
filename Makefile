# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build served locally; everything else installs against it.
TORCH_PIN := torch==2.13.0

.PHONY: demo test test-all env clean

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
	$(BIN)/python -m pytest -n 2 -q

test-all: env
	$(BIN)/python -m pytest -n 2 -q -m ""

clean:
	rm -rf outputs .pytest_cache
