# Two commands matter (see README): `make demo` and `make test`.
# Each creates .venv when it is missing. The torch wheel is installed first, pinned to the
# build that lies on this machine's disk, so pip never downloads a different multi-GB torch;
# override with `make TORCH_SPEC="torch==X torchvision==Y" test` elsewhere.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.cmda-installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cmda demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_mixing.py
	$(BIN)/python benchmarks/bench_gmm.py

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site build *.egg-info .pytest_cache .hypothesis
