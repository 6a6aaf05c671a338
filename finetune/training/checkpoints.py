"""Trainer checkpoints a run can safely resume from: sealed when complete, saved on a step or time schedule.

transformers 5 writes a checkpoint in place (`checkpoint-<step>/`: weights, optimizer, scheduler, RNG states,
trainer_state.json), so a kill or a power loss while saving leaves a folder that looks like a checkpoint. moetune
seals each checkpoint once Trainer has written it: every file is fsynced, then `moetune_checkpoint.json`, listing
the files and their sizes, is written atomically. The seal plays the part of renaming a temporary folder: only a
sealed checkpoint whose files still match it is resumed from; any other is reported, removed, and the previous
one is used. moetune also applies `save_total_limit` itself, after sealing: Trainer would delete the previous
checkpoint before the new one is sealed, leaving nothing to resume from if the run died in between.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import TrainerCallback

from finetune.core.rundir import write_json_atomic

# Trainer names its checkpoints `checkpoint-<global step>` inside output_dir (the stage's work folder).
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
SEAL = "moetune_checkpoint.json"


def checkpoints(work: Path) -> list[tuple[int, Path]]:
    """The Trainer checkpoints in a work folder, newest (highest step) first."""
    found = [(int(match.group(1)), path) for path in Path(work).iterdir()
             if path.is_dir() and (match := CHECKPOINT.fullmatch(path.name))]
    return sorted(found, reverse=True)


def saved_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.name != SEAL)


def seal(folder: Path) -> None:
    """Make a checkpoint's files and their folder entries durable, then record them: from here on it counts as
    complete, even after a power loss."""
    files = saved_files(folder)
    for path in [*files, *(path for path in folder.rglob("*") if path.is_dir()), folder]:
        fsync(path)
    sizes = {str(path.relative_to(folder)): path.stat().st_size for path in files}
    write_json_atomic(folder / SEAL, {"files": sizes})
    fsync(folder)


def fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)  # works for folders too (their entries), on Linux and macOS
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it is sealed and its files match the seal."""
    try:
        sizes = json.loads((folder / SEAL).read_text())["files"]
    except FileNotFoundError:
        return "it was never completed (interrupted while saving)"
    except (ValueError, KeyError):
        return f"its {SEAL} is damaged"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes but was saved with {size} (truncated or damaged)"
    return unreadable_file(folder, sizes)


def unreadable_file(folder: Path, names) -> str | None:
    """Cheap content checks beyond sizes: the trainer state parses, the safetensors headers read."""
    for name in names:
        path = folder / name
        try:
            if name.endswith(".json"):
                json.loads(path.read_text())
            elif name.endswith(".safetensors"):
                with safe_open(str(path), framework="pt"):
                    pass
        except Exception as error:  # a damaged file fails in many ways; all mean "do not resume from it"
            return f"{name} cannot be read ({type(error).__name__})"
    return None


def newest_usable_checkpoint(work: Path, stage_name: str, main_process: bool = True) -> tuple[int, Path] | None:
    """The newest checkpoint that passes checkpoint_problem. The main process reports unusable newer ones and
    removes them, so that Trainer does not later write into a folder that still holds stale files."""
    for step, path in checkpoints(work):
        problem = checkpoint_problem(path)
        if problem is None:
            return step, path
        if main_process:
            print(f"[{stage_name}] checkpoint {path} is unusable: {problem}. Removing it and falling back to the "
                  f"previous checkpoint.")
            shutil.rmtree(path)
    return None


class SealCheckpoints(TrainerCallback):
    """Seal every checkpoint Trainer saves, then keep only the newest `keep` (None keeps all)."""

    def __init__(self, work: Path, keep: int | None):
        self.work = Path(work)
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            seal(self.work / f"checkpoint-{state.global_step}")
            keep_newest(self.work, self.keep)


def keep_newest(work: Path, keep: int | None) -> None:
    if keep is None or keep <= 0:
        return
    for _, path in checkpoints(work)[keep:]:
        shutil.rmtree(path)


def clock() -> float:
    """Seconds on a clock that never goes back (a module function, so tests can run a fake one)."""
    return time.monotonic()


class SaveEveryMinutes(TrainerCallback):
    """Ask for a checkpoint once `minutes` have passed since the last one (or since training began)."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.last_save = clock()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_save = clock()

    def on_step_end(self, args, state, control, **kwargs):
        if all_processes_agree(clock() - self.last_save >= self.seconds, args):
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last_save = clock()


def all_processes_agree(due: bool, args) -> bool:
    """The main process's clock decides: every process must save at the same step, or the save's collectives hang."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return due
    flag = torch.tensor([int(due)], device=args.device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())
