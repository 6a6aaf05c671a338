"""The one list of moetune's stages, in pipeline order: what each runs, reads, writes and needs.

The CLI's commands and their --help, `run --stages`, the accelerate launch (which stages run on every process) and
the "run X first" errors all read this table. Stages never call each other: the pipeline runs them in this order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from finetune.stages import base_model, dpo, evaluate, prepare, sft
from finetune.config.recipe import Recipe


def always(recipe: Recipe) -> bool:
    return True


def builds_tiny_model(recipe: Recipe) -> bool:
    return recipe.model.init is not None


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: Callable[..., Path]  # run(recipe, force=False) -> the folder it committed (or its .partial work folder)
    sections: tuple[str, ...]  # the recipe sections it reads (besides run_dir and seed), for its --help
    folder: str  # what it writes: run_dir/<folder>
    needs: tuple[str, ...]  # the stages whose folders it reads
    every_process: bool  # under accelerate, every process runs it (training); otherwise it runs once, unlaunched
    description: str
    # A stage without a command of its own runs, when `applies` to the recipe, just before a stage that needs it.
    command: bool = True
    applies: Callable[[Recipe], bool] = always
    inputs: Callable[[Recipe], dict] | None = None  # what its output depends on (the manifest's fingerprint)


STAGES = (
    StageSpec("prep", prepare.run, ("data",), "data", (), every_process=False, inputs=prepare.stage_inputs,
              description="Build SFT conversations and preference pairs into run_dir/data."),
    StageSpec("base", base_model.run, ("model",), "base", ("prep",), every_process=True,
              description="Train a tokenizer on the data and build the model.init model into run_dir/base.",
              command=False, applies=builds_tiny_model, inputs=base_model.stage_inputs),
    StageSpec("sft", sft.run, ("model", "sft", "speed", "routing", "checkpoints"), "sft", ("prep", "base"), every_process=True,
              inputs=sft.stage_inputs,
              description="Supervised fine-tuning with TRL's SFTTrainer into run_dir/sft."),
    StageSpec("dpo", dpo.run, ("model", "dpo", "speed", "routing", "checkpoints"), "dpo", ("prep", "sft"), every_process=True,
              inputs=dpo.stage_inputs,
              description="DPO from the SFT result with TRL's DPOTrainer into run_dir/dpo."),
    # eval reads the folders of the stages named in eval.models, and the prep stage's questions by default.
    StageSpec("eval", evaluate.run, ("eval",), "eval", (), every_process=False, inputs=evaluate.stage_inputs,
              description="Answer held-out questions with each model, judge, report into run_dir/eval."),
)
BY_NAME = {spec.name: spec for spec in STAGES}
# The stages with a `moetune <name>` command, in pipeline order: what `moetune run` runs by default.
COMMANDS = tuple(spec.name for spec in STAGES if spec.command)


def hidden_needs(name: str, recipe: Recipe) -> list[StageSpec]:
    """The stages without a command that `name` needs and that apply to this recipe (base, for model.init)."""
    return [BY_NAME[need] for need in BY_NAME[name].needs if not BY_NAME[need].command and BY_NAME[need].applies(recipe)]


def command_writing(folder: str) -> str:
    """The command that makes run_dir/<folder>: its stage's, or for a stage without one, the first that needs it."""
    spec = next(spec for spec in STAGES if spec.folder == folder)
    if spec.command:
        return spec.name
    return next(other.name for other in STAGES if other.command and spec.name in other.needs)
