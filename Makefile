# Every target sets itself up on a fresh machine: a .venv, torch first (CPU wheel by default), then moetune.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.moetune-installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/moetune run recipes/tiny-moe.yaml

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) runs
