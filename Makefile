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

.PHONY: setup demo test fuzz bench docs clean

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

# tests/fuzz/ at the thorough hypothesis profile (>= 20,000 examples); prints the counts per property,
# writes benchmarks/results/fuzz.json and the figures of docs/reliability.md (exit status: pytest's)
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=thorough CMDA_FUZZ_REPORT=benchmarks/results/fuzz.json \
		$(BIN)/python -m pytest -n 2 -q -p no:cacheprovider tests/fuzz --ignore=tests/fuzz/test_fuzz_report.py $(PYTEST_ARGS); status=$$?; \
		$(BIN)/python tests/fuzz/fuzz_report.py benchmarks/results/fuzz.json; exit $$status

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_mixing.py
	$(BIN)/python benchmarks/bench_gmm.py

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site build *.egg-info .pytest_cache .hypothesis
