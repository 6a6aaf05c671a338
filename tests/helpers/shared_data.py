"""The real public data in ../shared/data (beside the repository, never copied into it).

Locally a test that needs it skips with a message when it is absent; under CI (CI=true, as .ci/run sets) it fails,
so a CI machine without the data cannot pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_shared_data(relative: str) -> Path:
    """The path of a file under ../shared/data; skips the test when it is absent (fails under CI)."""
    path = SHARED_DATA / relative
    if not path.is_file():
        message = f"real data {path} is absent (expected the shared data folder at ../shared/data, see its README.md)"
        if in_ci():
            pytest.fail(message + "; CI needs it", pytrace=False)
        pytest.skip(message)
    return path


def mt_bench_file(name: str) -> Path:
    return require_shared_data(f"mt_bench/{name}")
