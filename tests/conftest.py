"""Shared test set-up. Helpers the modules import live in tests/helpers/ (recipes, tiny models and tokenizers, the
shared data, subprocesses with deadlines); this file holds the fixtures built on them and the marker hooks.

Markers (registered in pyproject.toml): `slow` for tests over ~20 s on a 2-core machine (`-m "not slow"` for a quick
run), `multiprocess` for tests that start several training processes. Every test has a time limit (pytest-timeout,
pyproject.toml) and every subprocess wait has its own, so a stuck test fails instead of hanging the suite.
The `conformance` selection the GPU check runs on CUDA (`pytest -m conformance`, see tests/helpers/on_device.py): the tests
marked so, and every test of the per-family conformance files.
"""

from __future__ import annotations

import os
import shutil

# `make test` runs the suite on two pytest-xdist workers, one per core of a CI machine: each worker (and every
# process it starts, through the environment) computes on one thread, so the two do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest

from finetune.cli import main
from finetune.registry import BY_NAME

from helpers.on_device import CONFORMANCE_FILES
from helpers.recipes import write_recipe
from helpers.shared_data import SHARED_DATA, in_ci


def pytest_configure(config):
    config.addinivalue_line("markers", "conformance: an architecture test that also runs on the GPU in bf16 "
                                       "(MOETUNE_TEST_DEVICE=cuda; benchmarks/gpu_check.py)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name.startswith(CONFORMANCE_FILES):
            item.add_marker("conformance")


def pytest_report_header(config):
    state = "present" if SHARED_DATA.is_dir() else "ABSENT"
    mode = "tests that need it fail (CI)" if in_ci() else "tests that need it skip when absent"
    return f"shared data: {SHARED_DATA} ({state}; {mode})"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(recipe, run dir) of one finished `moetune run` of tiny.yaml, every stage: trained once per session for the
    modules that only read a finished run. A test that changes a run takes `tiny_run_copy`."""
    folder = tmp_path_factory.mktemp("tiny-run")
    recipe = write_recipe(folder)
    assert main(["run", str(recipe)]) == 0
    return recipe, folder / "run"


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path):
    """The finished tiny run copied into this test's tmp_path, with a recipe whose run_dir is the copy."""
    recipe = write_recipe(tmp_path)
    shutil.copytree(tiny_run[1], tmp_path / "run")
    return recipe, tmp_path / "run"


@pytest.fixture
def prepared_run(tiny_run):
    """A function (folder, stages) -> (recipe, run dir): tiny.yaml in `folder` whose run dir holds those stages'
    output (and the base model they need), copied from the session's finished tiny run instead of trained again."""
    def prepared(folder, stages=("prep",)):
        folder.mkdir()
        recipe = write_recipe(folder)
        folders = {BY_NAME[name].folder for name in stages}
        if folders - {"data"}:
            folders.add("base")
        for name in folders:
            shutil.copytree(tiny_run[1] / name, folder / "run" / name)
        return str(recipe), folder / "run"
    return prepared


@pytest.fixture
def tiny_recipe(tmp_path):
    """tiny.yaml (helpers.recipes.write_recipe) in this test's tmp_path."""
    return write_recipe(tmp_path)
