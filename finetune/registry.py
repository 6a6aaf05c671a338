"""The one list of moetune's stages, in pipeline order: every fact about a stage lives in its entry.

What each runs, reads, writes and needs, whether it loads a model, holds one, or is shown in the run report. The
CLI's commands and their --help, `run --stages`, the checks before running, the accelerate launch (which stages run
on every process), the report and the "run X first" errors all read this table. Stages never call each other: the
pipeline runs them in this order, and a stage's needs are checked here, once, before it runs.

The entries name their stage modules instead of importing them: the command line reads this table to parse its
arguments, print --help and check a recipe, and those must not wait seconds for the training stack (torch,
transformers, peft, trl) that the stage modules import. A module is imported when its stage runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from finetune.config.recipe import Recipe
from finetune.core.rundir import MissingStageOutput, read_manifest


def always(recipe: Recipe) -> bool:
    return True


def builds_tiny_model(recipe: Recipe) -> bool:
    return recipe.model.init is not None


@dataclass(frozen=True)
class StageSpec:
    name: str
    # The stage's module: run(recipe, needed, force) -> the folder it committed (or its .partial work folder), and
    # stage_inputs(recipe, needed) -> what its output depends on (the manifest's fingerprint). `needed` maps each
    # stage of `needs` that applies to the recipe to its manifest.
    module: str
    sections: tuple[str, ...]  # the recipe sections it reads (besides run_dir and seed), for its --help
    folder: str  # what it writes: run_dir/<folder>
    needs: tuple[str, ...]  # the stages whose folders it reads
    every_process: bool  # under accelerate, every process runs it (training); otherwise it runs once, unlaunched
    description: str
    # A stage without a command of its own runs, when `applies` to the recipe, just before a stage that needs it.
    command: bool = True
    applies: Callable[[Recipe], bool] = always
    loads_model: bool = False  # it loads the recipe's model: model.name_or_path is checked before it runs
    holds_model: bool = False  # its folder is a model (eval.models may name it); a chain is pushed in this order
    reported: bool = False  # run_dir/report.md shows its results: rebuilt each time it commits
    needs_named_models: bool = False  # it also needs the model stages eval.models (or a local judge) names: eval

    def stage_module(self) -> ModuleType:
        return importlib.import_module(self.module)

    def needs_for(self, recipe: Recipe) -> tuple[str, ...]:
        """The stages whose folders this one reads for this recipe: `needs`, and the model stages it is told to
        load by name."""
        if not self.needs_named_models:
            return self.needs
        named = {*recipe.eval.models, *([recipe.eval.judge.model] if recipe.eval.judge.type == "local" else [])}
        return (*self.needs, *(spec.name for spec in STAGES if spec.holds_model and spec.name in named))

    def needed(self, recipe: Recipe) -> dict[str, dict[str, Any]]:
        """The manifest of each stage this one needs (those that apply to the recipe), or the error naming the
        command to run first. The one place where stage dependencies are checked."""
        manifests = {}
        for need in (BY_NAME[name] for name in self.needs_for(recipe)):
            if not need.applies(recipe):
                continue
            manifest = read_manifest(recipe.run_path / need.folder)
            if manifest is None:
                raise MissingStageOutput(recipe.run_path / need.folder, needed_by=self.name)
            manifests[need.name] = manifest
        return manifests

    def inputs(self, recipe: Recipe) -> dict[str, Any]:
        return self.stage_module().stage_inputs(recipe, self.needed(recipe))

    def run(self, recipe: Recipe, force: bool | str = False) -> Path:
        return self.stage_module().run(recipe, self.needed(recipe), force)


STAGES = (
    StageSpec("prep", "finetune.stages.prepare", ("data",), "data", (), every_process=False,
              description="Build SFT conversations and preference pairs into run_dir/data."),
    StageSpec("base", "finetune.stages.base_model", ("model",), "base", ("prep",), every_process=True,
              description="Train a tokenizer on the data and build the model.init model into run_dir/base.",
              command=False, applies=builds_tiny_model, holds_model=True),
    StageSpec("sft", "finetune.stages.sft", ("model", "sft", "speed", "routing", "checkpoints"), "sft", ("prep", "base"),
              every_process=True, loads_model=True, holds_model=True, reported=True,
              description="Supervised fine-tuning with TRL's SFTTrainer into run_dir/sft."),
    StageSpec("dpo", "finetune.stages.dpo", ("model", "dpo", "speed", "routing", "checkpoints"), "dpo", ("prep", "sft"),
              every_process=True, loads_model=True, holds_model=True, reported=True,
              description="DPO from the SFT result with TRL's DPOTrainer into run_dir/dpo."),
    # eval reads the folders of the stages named in eval.models, and the prep stage's questions by default.
    StageSpec("eval", "finetune.stages.evaluate", ("eval",), "eval", (), every_process=False, loads_model=True,
              reported=True, needs_named_models=True,
              description="Answer held-out questions with each model, judge, report into run_dir/eval."),
)
BY_NAME = {spec.name: spec for spec in STAGES}
# The stages with a `moetune <name>` command, in pipeline order: what `moetune run` runs by default.
COMMANDS = tuple(spec.name for spec in STAGES if spec.command)


def hidden_needs(name: str, recipe: Recipe) -> list[StageSpec]:
    """The stages without a command that `name` needs and that apply to this recipe (base, for model.init)."""
    return [BY_NAME[need] for need in BY_NAME[name].needs_for(recipe)
            if not BY_NAME[need].command and BY_NAME[need].applies(recipe)]


def command_writing(folder: str) -> str:
    """The command that makes run_dir/<folder>: its stage's, or for a stage without one, the first that needs it."""
    spec = next(spec for spec in STAGES if spec.folder == folder)
    if spec.command:
        return spec.name
    return next(other.name for other in STAGES if other.command and spec.name in other.needs)
