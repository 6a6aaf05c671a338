"""An interrupted SFT run resumes from its newest complete checkpoint and ends where an uninterrupted run ends."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from finetune.cli import main
from tests.test_cli import write_recipe

OVERRIDES = ["sft.max_steps=8", "sft.save_strategy=steps", "sft.save_steps=2", "sft.logging_steps=1"]


def prepared_recipe(folder):
    """A tiny recipe in its own folder (so its own run dir), with the data stage done."""
    folder.mkdir()
    recipe = str(write_recipe(folder))
    assert main(["prep", recipe]) == 0
    return recipe, folder / "run"


def start_sft(recipe, overrides):
    command = [sys.executable, "-m", "finetune", "sft", recipe, *overrides]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not path.is_file():
        assert process.poll() is None, f"sft exited early: {process.communicate()}"
        assert time.time() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.05)


def losses_after(run, step):
    history = json.loads((run / "sft" / "metrics.json").read_text())
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry and entry["step"] > step}


def test_killed_sft_resumes_to_the_same_weights(tmp_path, capsys):
    reference_recipe, reference = prepared_recipe(tmp_path / "reference")
    assert main(["sft", reference_recipe, *OVERRIDES]) == 0

    recipe, run = prepared_recipe(tmp_path / "killed")
    process = start_sft(recipe, OVERRIDES)
    wait_for(run / ".sft.partial" / "checkpoint-4" / "trainer_state.json", process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    # Simulate a kill in the middle of writing the newest checkpoint: its weights are missing.
    newest = max((run / ".sft.partial").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    (newest / "model.safetensors").unlink()
    capsys.readouterr()

    assert main(["sft", recipe, *OVERRIDES]) == 0
    out = capsys.readouterr().out
    assert f"{newest} is incomplete" in out and "falling back to the previous checkpoint" in out
    step = int(re.search(r"resuming from \S+checkpoint-(\d+) \(step (\d+)\)", out).group(2))
    assert step < int(newest.name.split("-")[1])
    # Same seed, CPU, and the resume restores weights, optimizer, scheduler, RNG state and data order: bit-identical.
    # (Exact equality also guards the MoE expert weights, which Trainer alone would not restore.)
    expected, actual = load_file(reference / "sft" / "model.safetensors"), load_file(run / "sft" / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert losses_after(run, step) == losses_after(reference, step) and losses_after(run, step)
    assert not list((run / "sft").glob("checkpoint-*"))  # the committed output carries no optimizer state


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    recipe, run = prepared_recipe(tmp_path / "terminated")
    process = start_sft(recipe, [*OVERRIDES, "sft.max_steps=1000"])
    wait_for(run / ".sft.partial" / "checkpoint-2" / "trainer_state.json", process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    stopped = int(re.search(r"interrupted at step (\d+)", err).group(1))
    assert "Run the same command again to resume" in err
    assert (run / ".sft.partial" / f"checkpoint-{stopped}" / "optimizer.pt").is_file()
    assert not (run / "sft").exists()  # not committed
