"""The pipeline: runs stages in the registry's order and owns what happens between them.

A stage without a command of its own (base) runs just before the stage that needs it. A stage the recipe pushes
(`hub.push`) starts uploading as soon as it is committed, while the next stages run; the command waits for the
uploads at its end (`wait_for_uploads`).
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from finetune.core import distributed
from finetune.core.disk_errors import raise_disk_error
from finetune.stages.hub import HubError, push
from finetune.config.recipe import Recipe
from finetune.registry import BY_NAME, StageSpec, hidden_needs
from finetune.stages.report import write_report
from finetune.core.rundir import MANIFEST, StageError, read_manifest


def run_stage(name: str, recipe: Recipe, force: bool | str) -> None:
    """Run one stage, after the command-less stages it needs (`--force` redoes the named stage; those are redone
    only when their inputs changed)."""
    for spec in hidden_needs(name, recipe):
        run_one(spec, recipe, force="stale" if force else False)
    run_one(BY_NAME[name], recipe, force)


def run_one(spec: StageSpec, recipe: Recipe, force: bool | str) -> None:
    started = time.time()
    before = commit_stamp(recipe.run_path / spec.folder)
    main_process = distributed.is_main_process()  # in a multi-process run, one progress line per stage
    if main_process:
        print(f"== {spec.name}: {spec.description}", flush=True)
    try:
        output = spec.run(recipe, force=force)
    except Exception as error:  # a full disk surfaces as OSError, or as safetensors' or torch's own errors
        raise_disk_error(spec.name, error, recipe.run_path)
        raise
    if output.name.endswith(".partial"):
        # eval keeps a stage open while judge calls failed; a re-run retries only those.
        raise StageError(f"[{spec.name}] unfinished: some work failed and is kept in {output}. Run the same command again to retry it.")
    if main_process and commit_stamp(output) != before:  # committed by this run, not skipped as complete
        if spec.reported:
            print(f"[{spec.name}] run report with plots: {write_report(recipe.run_path)}", flush=True)
        push_stage_if_configured(recipe, output)
    if main_process:
        print(f"== {spec.name} finished in {time.time() - started:.0f}s", flush=True)


def commit_stamp(folder: Path) -> tuple[int, int] | None:
    """Differs after every commit of the folder, even within a second: each commit writes a new manifest file."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    stat = manifest.stat()
    return stat.st_ino, stat.st_mtime_ns


# `hub.push` uploads run one after another on a thread of their own while the next stages train: in a multi-process
# run the other processes would otherwise wait for the main one's upload at their next collective, and an upload of
# full weights can outlast the process-group timeout. The command ends with `wait_for_uploads`.
UPLOADER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moetune-push")
PENDING_UPLOADS: list[tuple[Path, Future]] = []


def push_stage_if_configured(recipe: Recipe, stage_dir: Path) -> None:
    """`hub.push: true`: start uploading a stage as soon as it is committed. A failed upload keeps the saved stage."""
    hub = recipe.hub
    if hub.push and stage_dir.name in hub.stages:
        parent = read_manifest(stage_dir)["outputs"].get("parent")
        # A parent pushed by this recipe was queued before (stages run in chain order): it is on the Hub first.
        parent_id = hub.repo_for(parent) if parent in hub.stages else None
        upload = UPLOADER.submit(push_or_explain, stage_dir, hub.repo_for(stage_dir.name), hub.private, parent_id)
        PENDING_UPLOADS.append((stage_dir, upload))


def push_or_explain(stage_dir: Path, repo_id: str, private: bool, parent_id: str | None = None) -> None:
    try:
        push(stage_dir, repo_id, private=private, parent_repo_id=parent_id)
    except Exception as error:  # noqa: BLE001 - any upload failure (network, auth, quota) must not fail training
        retry = (f"moetune push {stage_dir} --repo-id {repo_id}" + (" --private" if private else "")
                 + (f" --parent-repo-id {parent_id}" if parent_id else ""))
        reason = str(error)
        if not isinstance(error, HubError):
            reason = f"uploading {stage_dir} to {repo_id} failed ({type(error).__name__}: {error})."
        print(f"[push] {reason} The stage is saved; retry with `{retry}`.", file=sys.stderr)


def wait_for_uploads() -> None:
    """The end of a command: the uploads it started finish (or report their failure) before it returns."""
    while PENDING_UPLOADS:
        stage_dir, upload = PENDING_UPLOADS.pop(0)
        if not upload.done():
            print(f"[push] waiting for the upload of {stage_dir} to finish", flush=True)
        upload.result()
