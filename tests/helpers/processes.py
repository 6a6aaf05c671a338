"""Subprocesses in tests: every wait has a deadline, so a stuck child fails its test instead of hanging the suite."""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is an optional extra: pip install -e '.[deepspeed]'")


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


def kill_at_random_step(stage, recipe, overrides, log_file, first=5, last=9):
    """Run `python -m finetune <stage>` and SIGKILL it once it has logged a randomly drawn step (seeded) after the
    first checkpoints. Returns the step it was killed at (or just after: the kill lands while it runs on) and the
    wall-clock times at which each step was logged, the last one being the kill."""
    step = random.Random(8).randint(first, last)
    command = [sys.executable, "-m", "finetune", stage, recipe, *overrides]
    logged_at = []
    with open(log_file, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in output_lines(process, seconds=300):  # logging_steps=1: one "{'loss': ...}" line per step
            if line.startswith("{'loss'"):
                logged_at.append(time.time())
            if len(logged_at) == step:
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"{stage} ended before step {step}; see {log_file}"
    return step, logged_at


def run_subprocess(command: list[str], timeout: float = 300, **env: str) -> str:
    """Run `command` (a launcher or `python -m finetune ...`) to its end with `env` added to the environment;
    asserts it exits 0, showing the end of what it printed otherwise; returns its stdout."""
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def moetune(*args: str, timeout: float = 900) -> str:
    """`python -m finetune ARGS` in a subprocess, as a user runs it; asserts it exits 0, returns what it printed."""
    done = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"moetune {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr
