"""Shared test set-up. Helpers the modules import live in tests/helpers/ (recipes, tiny models and tokenizers, the
shared data, subprocesses with deadlines); this file holds the fixtures built on them and the marker hooks.

Markers (registered in pyproject.toml): `slow` for tests over ~20 s on a 2-core machine (`-m "not slow"` for a quick
run), `multiprocess` for tests that start several training processes. Every test has a time limit (pytest-timeout,
pyproject.toml) and every subprocess wait has its own, so a stuck test fails instead of hanging the suite.
The `conformance` selection the GPU check runs on CUDA (`pytest -m conformance`, see tests/helpers/on_device.py): the tests
marked so, and every test of the per-family conformance files.
"""

from __future__ import annotations

import pytest

from benchmarks.gpu_check import CONFORMANCE_FILES
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


@pytest.fixture
def tiny_recipe(tmp_path):
    """tiny.yaml (helpers.recipes.write_recipe) in this test's tmp_path."""
    return write_recipe(tmp_path)
