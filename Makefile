# Every target sets itself up on a fresh machine: a .venv, torch first (CPU wheel by default), then moetune.
PYTHON ?= python3
VENV ?= .venv
# pip arguments for torch, unquoted so that an index can follow: torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
# The versions the suite passed with; empty (`make install CONSTRAINTS=`) takes the newest releases pyproject allows.
CONSTRAINTS ?= constraints.txt
LATEST_VENV ?= .venv-latest
BIN := $(VENV)/bin
STAMP := $(VENV)/.moetune-installed

.PHONY: install demo test test-quick docs test-latest bench gpu-check gpu-carry clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install -q --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/moetune run recipes/tiny-moe.yaml

# Every test, on TEST_WORKERS pytest-xdist workers of one thread each (tests/conftest.py; the default 2 fits the
# 2-core CI machine: `make test TEST_WORKERS=8` on a larger one, TEST_WORKERS=0 in one process); pytest names the
# 15 slowest, so that a test that grew slow is seen.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15
test: install
	$(BIN)/lint-imports
	$(PYTEST) tests

# The same without the tests marked slow (minutes less; `make test` is what CI runs).
test-quick: install
	$(BIN)/lint-imports
	$(PYTEST) -m "not slow" tests

# The documentation site, docs/ into site/; --strict fails on a broken link or a page missing from the navigation.
docs: install
	$(BIN)/mkdocs build --strict

# The suite on the newest releases pyproject allows, in a fresh venv of its own (the pinned .venv stays as it is).
test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) test VENV=$(LATEST_VENV) CONSTRAINTS=

bench: install
	$(BIN)/python -m benchmarks

# On a GPU machine, with a CUDA build of torch: make gpu-check TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
gpu-check: install
	$(BIN)/python -m benchmarks.gpu_check

# What the lent GPU machine (no registry, no ../shared) needs beside the repository: benchmarks/GPU_RUN.md
gpu-carry: install
	$(BIN)/python -m benchmarks.gpu_carry

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs site
