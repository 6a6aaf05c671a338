"""The run-dir protocol: how a stage owns its folder in the run dir, and writing files atomically.

A stage works in `run_dir/.<name>.partial/` and, once everything is written, records a manifest
(`moetune_stage.json`: the fingerprint of its inputs, what it produced) and renames the folder to `run_dir/<name>/`.
So a folder named after a stage is always complete. A re-run with the same inputs skips the stage; a re-run with
different inputs refuses, naming what changed, unless `--force`. An interrupted run's work folder is resumed from
only when its inputs are the same; work made from other inputs is discarded when it holds no progress (a failed
first attempt: a bad data row, a bad model path), and refused, naming what changed, when it holds some
(checkpoints, answers). In a multi-process run only the main process changes the folders; the others check what
it prepared and wait for its commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.core import distributed

MANIFEST = "moetune_stage.json"
WORK_INPUTS = "moetune_work_inputs.json"  # in the .partial folder: what the unfinished work was made from


class StageError(RuntimeError):
    """A stage cannot start or finish; the message says which folder and what to do."""


def fingerprint(value: Any) -> str:
    """A stable hash of JSON-able inputs (recipe sections, upstream fingerprints, file hashes)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


@dataclass
class Stage:
    """One stage's output folder. Use `begin()`, write into `.work`, then `commit()`.

    `progress` lists glob patterns (relative to the work folder) of the work a re-run resumes from, such as
    Trainer checkpoints; a stage without any starts over whenever it runs.
    """

    run_dir: Path
    name: str
    inputs: dict[str, Any]
    progress: tuple[str, ...] = ()

    @property
    def final(self) -> Path:
        return Path(self.run_dir) / self.name

    @property
    def work(self) -> Path:
        return Path(self.run_dir) / f".{self.name}.partial"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs)

    def begin(self, force: bool | str = False) -> bool:
        """Prepare the work folder. Returns False when a complete output with the same inputs already exists.

        force: False refuses to replace an output made from other inputs; "stale" replaces it (`run --force`:
        unchanged stages are kept); True also redoes an output with the same inputs (`moetune <stage> --force`).
        """
        with distributed.main_process_first():  # every process decides the same from what the main one prepared
            return self.begin_here(force)

    def begin_here(self, force: bool | str) -> bool:
        manifest = read_manifest(self.final)
        same_inputs = manifest is not None and manifest.get("fingerprint") == self.fingerprint
        if same_inputs and force is not True:
            if distributed.is_main_process():
                hint = "" if force else " Use --force to redo it."
                print(f"[{self.name}] complete in {self.final} (same inputs): skipping.{hint}")
            return False
        if manifest is not None and not force:
            changed = changed_keys(manifest.get("inputs", {}), self.inputs)
            raise StageError(
                f"[{self.name}] {self.final} was made from different inputs (changed: {', '.join(changed) or 'unknown'}). "
                f"Run again with --force to redo this stage, or point run_dir at a new folder."
            )
        if self.final.exists() and manifest is None and any(self.final.iterdir()):
            raise StageError(
                f"[{self.name}] {self.final} exists but is not a moetune stage output; moetune will not overwrite it. "
                f"Move it away or choose another run_dir."
            )
        self.claim_work_folder(force)
        return True

    def claim_work_folder(self, force: bool) -> None:
        """Reuse an interrupted run's work (checkpoints, answers) only when it was made from the same inputs."""
        marker = self.work / WORK_INPUTS
        if marker.is_file():  # work from before markers existed is kept as it is
            previous = json.loads(marker.read_text())
            if previous.get("fingerprint") != self.fingerprint:
                changed = ", ".join(changed_keys(previous.get("inputs", {}), self.inputs)) or "unknown"
                saved = self.saved_progress()
                if saved and not force:
                    raise StageError(
                        f"[{self.name}] {self.work} holds an interrupted run made from different inputs (changed: "
                        f"{changed}) that saved {', '.join(path.name for path in saved[:3])}"
                        f"{', ...' if len(saved) > 3 else ''}; resuming it would be wrong. Restore the recipe to "
                        f"resume, or run again with --force to discard that work and start this stage over."
                    )
                if distributed.is_main_process():
                    if not saved:  # a failed attempt that got nowhere: nothing worth keeping, nothing to ask
                        print(f"[{self.name}] discarding {self.work}: an earlier attempt made from other inputs "
                              f"(changed: {changed}) that saved no progress.")
                    shutil.rmtree(self.work)
        if distributed.is_main_process():  # the other processes find the marker it wrote (same fingerprint)
            self.work.mkdir(parents=True, exist_ok=True)
            write_json_atomic(marker, {"fingerprint": self.fingerprint, "inputs": self.inputs})

    def saved_progress(self) -> list[Path]:
        """What an interrupted run saved that a re-run would resume from (empty: nothing worth keeping)."""
        return sorted(path for pattern in self.progress for path in self.work.glob(pattern))

    def commit(self, outputs: dict[str, Any] | None = None) -> Path:
        """Write the manifest, then atomically move the work folder into place (the main process; all wait)."""
        if distributed.is_main_process():
            self.commit_here(outputs)
        distributed.barrier()  # the other processes go on only once the stage is in place
        return self.final

    def commit_here(self, outputs: dict[str, Any] | None) -> None:
        manifest = {
            "stage": self.name,
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "outputs": outputs or {},
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (self.work / WORK_INPUTS).unlink(missing_ok=True)  # the manifest records the inputs from here on
        write_json_atomic(self.work / MANIFEST, manifest)
        if self.final.exists():
            # Only a previous complete output of this stage (checked in begin) is replaced, and only with --force.
            shutil.rmtree(self.final)
        os.replace(self.work, self.final)


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [prefix] if old != new else []
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        out.extend(changed_keys(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key)))
    return out


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to a temporary name, fsync, rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class MissingStageOutput(StageError):
    """An earlier stage's output is missing. Which command makes it is the stage registry's to say (`message`)."""

    def __init__(self, folder: Path, needed_by: str):
        self.folder, self.needed_by = Path(folder), needed_by
        super().__init__(self.message(self.folder.name))

    def message(self, command: str) -> str:
        return (f"[{self.needed_by}] needs the {self.folder.name} stage's output in {self.folder}, which is missing or "
                f"incomplete. Run `moetune {command} RECIPE` first (or `moetune run RECIPE`).")


def require_complete(run_dir: Path, name: str, needed_by: str) -> dict[str, Any]:
    """The manifest of an earlier stage, or an error telling the user which stage to run first."""
    manifest = read_manifest(Path(run_dir) / name)
    if manifest is None:
        raise MissingStageOutput(Path(run_dir) / name, needed_by)
    return manifest
