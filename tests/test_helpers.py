"""The test helpers' own guarantees: a silent subprocess fails its test in time, a reader that stops early does not
break the child's pipe, and shared-data tests fail instead of skipping under CI."""

import subprocess
import sys

import pytest

from helpers.processes import output_lines
from helpers.shared_data import require_shared_data

SILENT_CHILD = "import time; print('started', flush=True); time.sleep(60)"
CHATTY_CHILD = "import time\nfor i in range(3): print(i, flush=True); time.sleep(0.2)"


def test_a_child_that_stops_printing_is_killed_and_fails_the_test():
    process = subprocess.Popen([sys.executable, "-c", SILENT_CHILD], stdout=subprocess.PIPE, text=True)
    with pytest.raises(pytest.fail.Exception, match="killed"):
        for line in output_lines(process, seconds=2):
            assert line == "started\n"
    assert process.returncode is not None


def test_stopping_early_leaves_the_pipe_open_for_the_child():
    process = subprocess.Popen([sys.executable, "-c", CHATTY_CHILD], stdout=subprocess.PIPE, text=True)
    for line in output_lines(process, seconds=60):
        break
    rest, _ = process.communicate(timeout=60)
    assert (line, rest, process.returncode) == ("0\n", "1\n2\n", 0)


def test_missing_shared_data_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_shared_data("no/such/file.jsonl")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI needs it"):
        require_shared_data("no/such/file.jsonl")
