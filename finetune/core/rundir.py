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
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.core import distributed

MANIFEST = "moetune_stage.json"
WORK_INPUTS = "moetune_work_inputs.json"  # in the .partial folder: what the unfinished work was made from


class StageError(RuntimeError):
    """A stage cannot start or finish; the message says which folder and what to do."""


class Interrupted(StageError):
    """Ctrl-C (SIGINT) or SIGTERM stopped a stage after it saved its work; the command exits 128 + the signal's
    number, as shells expect (130 for Ctrl-C)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


def fingerprint(value: Any) -> str:
    """A stable hash of JSON-able inputs (recipe sections, upstream fingerprints, file hashes)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file's content, read in blocks (a data file may be large); "missing" where there is no file."""
    if not path.is_file():
        return "missing"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


@dataclass
class Stage:
    """One stage's output folder. Use `begin()`, write into `.work`, then `commit()`.

    `progress` lists glob patterns (relative to the work folder) of the work a re-run resumes from, such as
    Trainer checkpoints; a stage without any starts over whenever it runs. `progress_inputs` names, per pattern, the
    part of `inputs` that work depends on (default: all of them): when only other inputs change, that work is kept,
    so eval's answers survive a new judge model, which discards only the judgments.
    """

    run_dir: Path
    name: str
    inputs: dict[str, Any]
    progress: tuple[str, ...] = ()
    progress_inputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def final(self) -> Path:
        return Path(self.run_dir) / self.name

    @property
    def work(self) -> Path:
        return Path(self.run_dir) / f".{self.name}.partial"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs)

    def progress_fingerprints(self) -> dict[str, str]:
        return {pattern: fingerprint(self.progress_inputs.get(pattern, self.inputs)) for pattern in self.progress}

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
        if manifest is not None and not same_inputs and distributed.is_main_process():
            self.reuse_finished_work(manifest)
        return True

    def claim_work_folder(self, force: bool) -> None:
        """Reuse an interrupted run's work (checkpoints, answers) only when it was made from the same inputs."""
        marker = self.work / WORK_INPUTS
        if marker.is_file():  # work from before markers existed is kept as it is
            previous = json.loads(marker.read_text())
            if previous.get("fingerprint") != self.fingerprint:
                self.drop_stale_work(previous, force)
        if distributed.is_main_process():  # the other processes find the marker it wrote (same fingerprint)
            self.work.mkdir(parents=True, exist_ok=True)
            write_json_atomic(marker, {"fingerprint": self.fingerprint, "inputs": self.inputs,
                                       "progress": self.progress_fingerprints()})

    def drop_stale_work(self, previous: dict[str, Any], force: bool) -> None:
        """Work made from other inputs: keep the progress whose own inputs did not change, refuse (unless force)
        to discard the rest when it holds progress."""
        changed = ", ".join(changed_keys(previous.get("inputs", {}), self.inputs)) or "unknown"
        kept, stale = self.split_progress(self.work, previous.get("progress", {}))
        if stale and not force:
            raise StageError(
                f"[{self.name}] {self.work} holds an interrupted run made from different inputs (changed: "
                f"{changed}) that saved {', '.join(path.name for path in stale[:3])}"
                f"{', ...' if len(stale) > 3 else ''}; resuming it would be wrong. Restore the recipe to "
                f"resume, or run again with --force to discard that work and start this stage over."
            )
        if not distributed.is_main_process():
            return
        if kept:
            print(f"[{self.name}] changed: {changed}; keeping {len(kept)} saved files that do not depend on it "
                  f"({', '.join(path.name for path in kept[:3])}{', ...' if len(kept) > 3 else ''})"
                  + (f", discarding {len(stale)}." if stale else "."))
            remove_all_but(self.work, kept)
            return
        if not stale:  # a failed attempt that got nowhere: nothing worth keeping, nothing to ask
            print(f"[{self.name}] discarding {self.work}: an earlier attempt made from other inputs "
                  f"(changed: {changed}) that saved no progress.")
        shutil.rmtree(self.work)

    def split_progress(self, folder: Path, fingerprints: dict[str, str]) -> tuple[list[Path], list[Path]]:
        """(kept, stale): the saved progress in `folder` whose inputs are (are not) those it was made from."""
        now = self.progress_fingerprints()
        kept, stale = [], []
        for pattern in self.progress:
            paths = sorted(folder.glob(pattern))
            (kept if fingerprints.get(pattern) == now[pattern] else stale).extend(paths)
        return kept, stale

    def reuse_finished_work(self, manifest: dict[str, Any]) -> None:
        """A complete output redone because some inputs changed: copy in the progress that does not depend on them
        (eval's answers when only the judge changed), unless an interrupted redo already holds it."""
        kept, _ = self.split_progress(self.final, manifest.get("progress", {}))
        copied = []
        for path in kept:
            target = self.work / path.relative_to(self.final)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if path.is_dir() else shutil.copy2)(path, target)
                copied.append(path.name)
        if copied:
            print(f"[{self.name}] reusing {', '.join(copied[:3])}{', ...' if len(copied) > 3 else ''} from "
                  f"{self.final}: made from the same inputs.")

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
            "progress": self.progress_fingerprints(),
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


def remove_all_but(folder: Path, kept: list[Path]) -> None:
    """Delete everything in `folder` except the `kept` files and folders (and the folders holding them)."""
    for path in sorted(folder.rglob("*"), reverse=True):  # children before their folder
        if any(path == keep or keep in path.parents for keep in kept):
            continue
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink()


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


def require_empty(folder: Path, option: str) -> None:
    """Refuse to write into a folder that holds files (an output of moetune's folder commands: merge, export, push)."""
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{option} {folder} exists and is not empty; moetune will not overwrite it. Choose a new folder.")
