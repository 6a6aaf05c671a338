"""The pipeline: runs stages in the registry's order and owns what happens between them.

A stage without a command of its own (base) runs just before the stage that needs it.
"""

from __future__ import annotations

import time

from finetune import distributed
from finetune.disk_errors import raise_disk_error
from finetune.recipe import Recipe
from finetune.registry import BY_NAME, StageSpec, hidden_needs
from finetune.rundir import StageError


def run_stage(name: str, recipe: Recipe, force: bool) -> None:
    """Run one stage, after the command-less stages it needs (never forced: `--force` redoes the named stage)."""
    for spec in hidden_needs(name, recipe):
        run_one(spec, recipe, force=False)
    run_one(BY_NAME[name], recipe, force)


def run_one(spec: StageSpec, recipe: Recipe, force: bool) -> None:
    started = time.time()
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
    if main_process:
        print(f"== {spec.name} finished in {time.time() - started:.0f}s", flush=True)
