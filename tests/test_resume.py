"""Interrupted SFT and DPO runs resume from their newest usable checkpoint and end where an uninterrupted run ends."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import finetune.training.checkpoints
from finetune.training.checkpoints import SEAL, checkpoint_problem, checkpoints
from finetune.cli import main
from finetune.config.recipe import CheckpointConfig, Recipe
from finetune.training.trainer_config import moetune_defaults
from helpers.processes import kill_at_random_step, output_lines

pytestmark = pytest.mark.slow  # every test here trains through the pipeline

SCHEDULE = ["save_strategy=steps", "save_steps=2", "save_total_limit=2", "logging_steps=1"]
SFT = ["sft.max_steps=12", *(f"sft.{setting}" for setting in SCHEDULE)]
DPO = ["dpo.max_steps=12", *(f"dpo.{setting}" for setting in SCHEDULE)]


def losses(stage_folder):
    history = json.loads((stage_folder / "metrics.json").read_text())
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def resumed_step(out):
    return int(re.search(r"resuming from \S+checkpoint-(\d+) \(step (\d+)\)", out).group(2))


def assert_same_tensors(expected_file, actual_file):
    expected, actual = load_file(expected_file), load_file(actual_file)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def damage_newest_checkpoint(work, file_name):
    """Truncate a file of the newest sealed checkpoint, as a disk fault or a copy cut short would."""
    newest = checkpoints(work)[0][1]
    if checkpoint_problem(newest) is not None:  # killed while saving: the newest is already unusable
        newest = checkpoints(work)[1][1]
    path = newest / file_name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return newest


def uninterrupted(stage, recipe, run, overrides, folder):
    """Run a stage to the end, then move its output to `folder`, so the same run dir can run it again."""
    assert main([stage, recipe, *overrides]) == 0
    return shutil.move(run / stage, folder)


def test_killed_sft_resumes_to_the_same_weights(prepared_run, tmp_path, capsys):
    recipe, run = prepared_run(tmp_path / "run")
    reference = uninterrupted("sft", recipe, run, SFT, tmp_path / "reference")
    kill_at_random_step("sft", recipe, SFT, tmp_path / "sft.log")
    work = run / ".sft.partial"
    sealed = [path for _, path in checkpoints(work) if checkpoint_problem(path) is None]
    assert 1 <= len(sealed) <= 2  # save_total_limit: 2
    damaged = damage_newest_checkpoint(work, "model.safetensors")
    capsys.readouterr()

    assert main(["sft", recipe, *SFT]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {damaged} is unusable: model.safetensors is" in out
    assert "(truncated or damaged). Removing it and falling back to the previous checkpoint." in out
    step = resumed_step(out)
    assert 0 < step < int(damaged.name.split("-")[1])
    # Same seed, CPU, and the resume restores weights, optimizer, scheduler, RNG state and data order: bit-identical.
    # (Exact equality also guards the MoE expert weights, which Trainer alone would not restore.)
    assert_same_tensors(reference / "model.safetensors", run / "sft" / "model.safetensors")
    assert losses(run / "sft") == losses(reference) and len(losses(reference)) == 12
    assert not list((run / "sft").glob("checkpoint-*"))  # the committed output carries no optimizer state


def test_killed_dpo_with_adapters_resumes_to_the_same_adapter(prepared_run, tmp_path, capsys):
    recipe, run = prepared_run(tmp_path / "run", stages=("prep", "sft"))
    reference = uninterrupted("dpo", recipe, run, DPO, tmp_path / "reference")
    kill_at_random_step("dpo", recipe, DPO, tmp_path / "dpo.log")
    work = run / ".dpo.partial"
    capsys.readouterr()

    # A different adapter shape cannot continue these checkpoints: refused, naming the key, the folder and --force.
    assert main(["dpo", recipe, *DPO, "model.lora.r=8"]) == 2
    err = capsys.readouterr().err
    assert f"{work} holds an interrupted run made from different inputs (changed: model.lora.r)" in err
    assert "--force" in err and checkpoints(work)

    damaged = damage_newest_checkpoint(work, "trainer_state.json")
    assert main(["dpo", recipe, *DPO]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {damaged} is unusable: trainer_state.json is" in out and "falling back" in out
    assert 0 < resumed_step(out) < int(damaged.name.split("-")[1])
    # The adapter (LoRA on attention and the fused experts) and every logged loss match the uninterrupted run.
    assert_same_tensors(reference / "adapter_model.safetensors", run / "dpo" / "adapter_model.safetensors")
    assert losses(run / "dpo") == losses(reference) and len(losses(reference)) == 12


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(prepared_run, tmp_path):
    recipe, run = prepared_run(tmp_path / "terminated")
    command = [sys.executable, "-m", "finetune", "sft", recipe, *SFT, "sft.max_steps=1000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in output_lines(process, seconds=300):
        if line.startswith("{'loss'"):
            process.send_signal(signal.SIGTERM)
            break
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = int(re.search(r"interrupted at step (\d+)", err).group(1))
    assert "Run the same command again to resume" in err
    assert checkpoint_problem(run / ".sft.partial" / f"checkpoint-{stopped}") is None  # complete and sealed
    assert not (run / "sft").exists()  # not committed


def test_checkpoints_every_few_minutes_keep_the_newest(prepared_run, tmp_path, monkeypatch):
    """checkpoints.every_minutes saves on a clock, here a fake one that advances 20 seconds whenever it is read
    (once per step, at the start and at each save), so a minute passes every three steps."""
    recipe, run = prepared_run(tmp_path / "timed")
    now = iter(range(0, 10_000, 20))
    monkeypatch.setattr(finetune.training.checkpoints, "clock", lambda: next(now))
    kept = []
    keep_newest = finetune.training.checkpoints.keep_newest

    def record(work, keep):
        keep_newest(work, keep)
        kept.append({step: checkpoint_problem(path) for step, path in checkpoints(work)})
    monkeypatch.setattr(finetune.training.checkpoints, "keep_newest", record)

    assert main(["sft", recipe, "sft.max_steps=10", "sft.save_total_limit=2", "checkpoints.every_minutes=1"]) == 0
    assert kept == [{3: None}, {6: None, 3: None}, {9: None, 6: None}]  # sealed, and only the newest two kept
    assert not list((run / "sft").glob("checkpoint-*")) and (run / "sft" / "model.safetensors").is_file()


def test_checkpoints_are_on_by_default_and_trl_fields_show_moetunes_defaults(capsys):
    assert CheckpointConfig().every_minutes == 30  # a kill loses at most 30 minutes, with nothing set
    for stage in ("sft", "dpo"):
        defaults = moetune_defaults(Recipe(run_dir="").trainer_settings(stage))
        # no step schedule unless the recipe sets one; the newest two checkpoints of either kind are kept
        assert defaults["save_strategy"] == "no" and defaults["save_total_limit"] == 2
        assert main([stage, "--trl-fields"]) == 0
        out = capsys.readouterr().out
        assert "Checkpoints: every 30 minutes (checkpoints.every_minutes) and on SIGTERM/Ctrl-C" in out
        for field, ours, trls in [("save_strategy", "'no'", "'steps'"), ("save_total_limit", "2", "None"),
                                  ("use_cpu", str(not torch.cuda.is_available()), "False"),
                                  ("activation_checkpointing", str(torch.cuda.is_available()), "None"),
                                  ("logging_steps", "10", "10"), ("report_to", "'none'", "'none'")]:
            assert f"  {stage}.{field} (moetune default {ours}; TRL's {trls}): " in out
    assert main(["sft", "--trl-fields"]) == 0 and "sft.assistant_only_loss (moetune default True; TRL's False)" in \
        capsys.readouterr().out


def test_killed_sft_resumes_from_the_default_time_schedule(prepared_run, tmp_path, capsys):
    """No step schedule: only checkpoints.every_minutes (made small here) saves. kill -9 at a random step loses at
    most that schedule's interval plus the step (and save) in progress."""
    recipe, run = prepared_run(tmp_path / "run")
    every_minutes = 0.0005  # 30 ms: below one step on any machine, so a checkpoint is due at every step
    overrides = ["sft.max_steps=12", "sft.logging_steps=1", f"checkpoints.every_minutes={every_minutes}"]
    step, logged_at = kill_at_random_step("sft", recipe, overrides, tmp_path / "sft.log", first=6, last=10)
    work = run / ".sft.partial"
    sealed = [(number, path) for number, path in checkpoints(work) if checkpoint_problem(path) is None]
    assert sealed and len(sealed) <= 2  # save_total_limit's default: 2
    newest_step, newest = sealed[0]
    longest_step = max(later - earlier for earlier, later in zip(logged_at, logged_at[1:]))
    age = logged_at[-1] - (newest / SEAL).stat().st_mtime
    assert age <= every_minutes * 60 + longest_step + 0.5, (age, longest_step)
    capsys.readouterr()

    assert main(["sft", recipe, *overrides]) == 0
    assert resumed_step(capsys.readouterr().out) == newest_step > 0
    assert len(losses(run / "sft")) == 12 and not list((run / "sft").glob("checkpoint-*"))
