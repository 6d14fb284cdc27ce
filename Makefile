# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The pinned torch goes in first: a plain `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.base
	$(BIN)/pip install -q -e '.[test,serve]'
	touch $@

demo: $(VENV)/.base
	$(BIN)/diffusekit demo --out demo-output

test: $(VENV)/.test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(VENV)/.test
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) demo-output
