"""Shared test set-up. Helpers the modules import live in tests/helpers/ (recipes, tiny models and tokenizers, the
shared data, subprocesses with deadlines); this file holds the fixtures built on them.

Markers (registered in pyproject.toml): `slow` for tests over ~20 s on a 2-core machine (`-m "not slow"` for a quick
run), `multiprocess` for tests that start several training processes. Every test has a time limit (pytest-timeout,
pyproject.toml) and every subprocess wait has its own, so a stuck test fails instead of hanging the suite.
"""

from __future__ import annotations

import pytest

from helpers.recipes import write_recipe
from helpers.shared_data import SHARED_DATA, in_ci


def pytest_report_header(config):
    state = "present" if SHARED_DATA.is_dir() else "ABSENT"
    mode = "tests that need it fail (CI)" if in_ci() else "tests that need it skip when absent"
    return f"shared data: {SHARED_DATA} ({state}; {mode})"


@pytest.fixture
def tiny_recipe(tmp_path):
    """tiny.yaml (helpers.recipes.write_recipe) in this test's tmp_path."""
    return write_recipe(tmp_path)
