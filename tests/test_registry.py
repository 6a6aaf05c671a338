"""The stage registry: the one list of stages that the CLI, the pipeline and the launch read."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

import finetune.stages.sft
from finetune import launch, pipeline
from finetune.cli import build_parser, parse_stages
from finetune.config.recipe import Recipe
from finetune.config.parsing import parse_recipe
from finetune.registry import BY_NAME, COMMANDS, STAGES, command_writing, hidden_needs
from finetune.core.rundir import MissingStageOutput, Stage, write_json_atomic


def tiny_recipe(tmp_path, **model):
    return parse_recipe({"run_dir": str(tmp_path), "model": model or {"init": {}}}, str(tmp_path / "recipe.yaml"))


def test_stages_in_pipeline_order_with_sections_and_needs_that_exist():
    assert [spec.name for spec in STAGES] == ["prep", "base", "sft", "dpo", "eval"]
    recipe_sections = {f.name for f in dataclasses.fields(Recipe)}
    for index, spec in enumerate(STAGES):
        assert set(spec.sections) <= recipe_sections, spec.name
        earlier = {other.name for other in STAGES[:index]}
        assert set(spec.needs) <= earlier, f"{spec.name} needs a stage that runs after it"
    assert len({spec.folder for spec in STAGES}) == len(STAGES)


def test_every_entry_names_a_stage_module_with_run_and_inputs():
    for spec in STAGES:
        module = importlib.import_module(spec.module)
        assert callable(module.run) and callable(module.stage_inputs), spec.name
    assert [spec.name for spec in STAGES if spec.loads_model] == ["sft", "dpo", "eval"]
    assert [spec.name for spec in STAGES if spec.holds_model] == ["base", "sft", "dpo"]
    assert [spec.name for spec in STAGES if spec.reported] == ["sft", "dpo", "eval"]


def test_needs_are_checked_by_the_registry_before_a_stage_runs(tmp_path):
    recipe = tiny_recipe(tmp_path)
    with pytest.raises(MissingStageOutput, match=r"\[dpo\] needs the data stage's output"):
        BY_NAME["dpo"].inputs(recipe)
    write_json_atomic(tmp_path / "data" / "moetune_stage.json", {"stage": "data", "fingerprint": "d1"})
    with pytest.raises(MissingStageOutput, match=r"\[dpo\] needs the sft stage's output"):
        BY_NAME["dpo"].run(recipe)
    # base is needed by sft only where it applies (model.init recipes): a hub model's sft needs only the data
    assert BY_NAME["sft"].needed(tiny_recipe(tmp_path, name_or_path="some/model")) == \
        {"prep": {"stage": "data", "fingerprint": "d1"}}
    with pytest.raises(MissingStageOutput, match=r"\[sft\] needs the base stage's output"):
        BY_NAME["sft"].needed(recipe)


def test_eval_needs_the_model_stages_it_names(tmp_path):
    """eval loads the stages eval.models names: the registry checks them (and builds a model.init base) first."""
    recipe = parse_recipe({"run_dir": str(tmp_path), "model": {"init": {}}, "eval": {"models": ["base", "dpo", "org/m"]}},
                          str(tmp_path / "recipe.yaml"))
    assert BY_NAME["eval"].needs_for(recipe) == ("base", "dpo")
    assert [spec.name for spec in hidden_needs("eval", recipe)] == ["base"]
    with pytest.raises(MissingStageOutput, match=r"\[eval\] needs the base stage's output"):
        BY_NAME["eval"].needed(recipe)
    for folder in ("base", "dpo"):
        write_json_atomic(tmp_path / folder / "moetune_stage.json", {"stage": folder, "fingerprint": folder[0]})
    assert BY_NAME["eval"].needed(recipe) == {"base": {"stage": "base", "fingerprint": "b"},
                                              "dpo": {"stage": "dpo", "fingerprint": "d"}}
    # a hub model's base is the recipe's model.name_or_path: nothing to check, nothing to build
    hub_recipe = parse_recipe({"run_dir": str(tmp_path / "hub"), "model": {"name_or_path": "org/base"},
                               "eval": {"models": ["base"]}}, str(tmp_path / "recipe.yaml"))
    assert BY_NAME["eval"].needed(hub_recipe) == {} and hidden_needs("eval", hub_recipe) == []


def test_commands_and_help_come_from_the_registry():
    assert COMMANDS == ("prep", "sft", "dpo", "eval")  # base has no command of its own
    assert parse_stages("eval,prep") == ["prep", "eval"]
    choices = build_parser()._subparsers._group_actions[0].choices
    assert [name for name in choices if name in BY_NAME] == list(COMMANDS)
    assert choices["sft"].description == BY_NAME["sft"].description


def test_base_runs_before_sft_only_for_model_init_recipes(tmp_path):
    assert hidden_needs("sft", tiny_recipe(tmp_path)) == [BY_NAME["base"]]
    assert hidden_needs("sft", tiny_recipe(tmp_path, name_or_path="some/model")) == []
    assert hidden_needs("dpo", tiny_recipe(tmp_path)) == []


def test_missing_folders_name_the_command_that_makes_them():
    assert command_writing("data") == "prep"
    assert command_writing("base") == "sft"  # built by `moetune sft` (or run) for model.init recipes
    assert command_writing("dpo") == "dpo"


def test_launch_runs_the_training_stages_on_every_process_and_the_others_once():
    assert launch.EVERY_PROCESS_STAGES == ("base", "sft", "dpo")
    assert launch.SINGLE_PROCESS_STAGES == ("prep", "eval")


def test_the_pipeline_pushes_a_stage_it_committed_and_not_one_it_skipped(tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(pipeline, "push_stage_if_configured", lambda recipe, folder: pushed.append(folder.name))

    def run(recipe, needed, force=False):
        stage = Stage(recipe.run_path, "sft", inputs={"steps": 1})
        return stage.commit({}) if stage.begin(force) else stage.final

    monkeypatch.setattr(finetune.stages.sft, "run", run)
    spec = dataclasses.replace(BY_NAME["sft"], needs=())
    recipe = tiny_recipe(tmp_path)
    pipeline.run_one(spec, recipe, force=False)
    pipeline.run_one(spec, recipe, force=False)  # complete with the same inputs: skipped
    assert pushed == ["sft"]
    pipeline.run_one(spec, recipe, force=True)  # redone within the same second
    assert pushed == ["sft", "sft"]
