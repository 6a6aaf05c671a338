"""Subprocesses in tests: every wait has a deadline, so a stuck child fails its test instead of hanging the suite."""

from __future__ import annotations

import subprocess
import threading
from typing import Iterator

import pytest


def output_lines(process: subprocess.Popen, seconds: float) -> Iterator[str]:
    """`process.stdout` line by line. If the process still runs after `seconds` it is killed, which ends the read,
    and the test fails; a caller that stops reading early (break) cancels the deadline."""
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        process.kill()

    timer = threading.Timer(seconds, kill)
    timer.start()
    try:
        for line in process.stdout:  # not `yield from`: closing this generator would close the pipe too
            yield line
    finally:
        timer.cancel()
    if expired.is_set():
        process.wait(timeout=30)
        pytest.fail(f"{process.args} printed no awaited line within {seconds:.0f} s and was killed")
