"""Recipe parsing, validation messages, overrides, and the stage-dir protocol."""

import pytest

from finetune.config.recipe import RecipeError
from finetune.config.parsing import load_recipe, parse_recipe
from finetune.core.rundir import Stage, StageError

TINY = {"run_dir": "runs/x", "model": {"init": {}}}


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_shipped_demo_recipe_parses():
    recipe = load_recipe("recipes/tiny-moe.yaml")
    assert recipe.model.init.architecture == "mixtral"
    assert recipe.model.lora_for("sft") is None and recipe.model.lora_for("dpo").r == 16


@pytest.mark.parametrize("raw, message", [
    ({**TINY, "modle": {}}, "unknown key 'modle'. Did you mean 'model'?"),
    ({**TINY, "model": {"init": {"hiden_size": 3}}}, "unknown key 'model.init.hiden_size'. Did you mean 'hidden_size'?"),
    ({**TINY, "sft": {"learnig_rate": 1}}, "unknown key 'sft.learnig_rate'. Did you mean 'learning_rate'?"),
    ({**TINY, "dpo": {"bta": 0.1}}, "unknown key 'dpo.bta'. Did you mean 'beta'?"),
    ({**TINY, "sft": {"output_dir": "x"}}, "sft.output_dir is TRL's, but moetune does that itself: remove it and use run_dir"),
    ({**TINY, "sft": {"push_to_hub": True}}, "sft.push_to_hub is TRL's, but moetune does that itself: remove it and use "
                                             "the recipe's hub: section"),
    ({**TINY, "dpo": {"hub_model_id": "me/x"}}, "dpo.hub_model_id is TRL's, but moetune does that itself"),
    ({**TINY, "dpo": {"resume_from_checkpoint": "c"}}, "use re-running the same command: it resumes from the newest"),
    ({**TINY, "data": {"dedup": "prompts"}}, "data.dedup is 'prompts'; choose one of exact, prompt, none. Did you mean"),
    ({**TINY, "data": {"sources": [{"format": "hh"}]}}, "data.sources[0].format is 'hh'; choose one of"),
    ({**TINY, "eval": {"judge": {"type": "opnai"}}}, "eval.judge.type is 'opnai'; choose one of programmatic, openai, "
                                                     "local. Did you mean 'openai'?"),
    ({**TINY, "eval": {"models": []}}, "eval.models is empty"),
    ({**TINY, "model": {"init": {"num_layers": "two"}}}, "model.init.num_layers must be an integer, got 'two'"),
    ({**TINY, "model": {"init": {}, "lora": {"targets": ["experts", "routr"]}}}, "Did you mean 'router'?"),
    ({"run_dir": "x", "model": {}}, "set exactly one of model.name_or_path"),
    ({"model": {"init": {}}}, "run_dir is required"),
    ({**TINY, "hub": {"push": True}}, "hub.push is true but hub.repo_id is not set"),
    ({**TINY, "hub": {"push": True, "repo_id": "me/x"}}, "Put {stage} in hub.repo_id (e.g. me/x-{stage})"),
    ({**TINY, "hub": {"stages": ["sfr"]}}, "Did you mean 'sft'?"),
    ({**TINY, "hub": {"push": True, "repo_id": "my org/x-{stage}"}}, "'my org/x-sft', which is not a valid Hub"),
    ({**TINY, "routing": {"hot_load": 1}}, "routing.hot_load is 1; it must be above 1"),
    ({**TINY, "routing": {"dead_load": 1.5}}, "routing.dead_load is 1.5; it must be in [0, 1)"),
    ({**TINY, "routing": {"max_overhead": 0}}, "routing.max_overhead is 0; it must be in (0, 1]"),
    ({**TINY, "routing": {"probe_sequences": -1}}, "routing.probe_sequences is -1; it must be >= 0"),
    ({**TINY, "routing": {"alarm_logs": 0}}, "routing.alarm_logs is 0; it must be a positive integer"),
])
def test_bad_recipes_name_the_file_key_and_fix(raw, message):
    with pytest.raises(RecipeError) as error:
        parse_recipe(raw, "recipes/mine.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("recipes/mine.yaml:")


PLANTED = "hf_" + "Planted0Secret1Value2For3Tests4"


@pytest.mark.parametrize("section, message", [
    ({"sft": {"hub_token": PLANTED}}, "sft.hub_token would hold a credential"),
    ({"dpo": {"hub_token": PLANTED}}, "dpo.hub_token would hold a credential"),
    ({"eval": {"judge": {"api_key": "sk-" + PLANTED}}}, "eval.judge.api_key would hold a credential"),
    ({"eval": {"judge": {"headers": {"Authorization": "Bearer " + PLANTED}}}}, "eval.judge.headers would hold"),
    ({"eval": {"judge": {"api_key_env": "sk-" + PLANTED}}}, "eval.judge.api_key_env holds what looks like"),
    ({"sft": {"run_name": PLANTED}}, "sft.run_name holds what looks like an access token"),
])
def test_credentials_are_refused_with_where_they_go_and_never_repeated(section, message):
    with pytest.raises(RecipeError) as error:
        parse_recipe({**TINY, **section}, "recipes/mine.yaml")
    text = str(error.value)
    assert message in text and PLANTED not in text
    assert ("api_key_env" if "eval" in section else "hf auth login") in text


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "run_dir: a\nmodel: {init: {}}\nsft: {learning_rate: 1.0e-3}\n")
    recipe = load_recipe(path, ["sft.learning_rate=5e-4", "sft.max_steps=50", "model.lora.r=4", "run_dir=b"])
    assert recipe.sft == {"learning_rate": 5e-4, "max_steps": 50}
    assert recipe.model.lora.r == 4 and recipe.run_dir == "b"
    with pytest.raises(RecipeError, match="Did you mean 'max_steps'"):
        load_recipe(path, ["sft.max_step=5"])
    with pytest.raises(RecipeError, match="dotted.key=value"):
        load_recipe(path, ["sft.max_steps"])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "model: [unclosed"))


def test_stage_commits_atomically_skips_and_refuses_changes(tmp_path, capsys):
    stage = Stage(tmp_path, "sft", inputs={"lr": 1})
    assert stage.begin()
    (stage.work / "weights").write_text("w")
    assert not (tmp_path / "sft").exists()  # nothing named after the stage until it is complete
    stage.commit({"kind": "full"})
    assert (tmp_path / "sft" / "weights").read_text() == "w" and not stage.work.exists()

    assert not Stage(tmp_path, "sft", inputs={"lr": 1}).begin()
    assert "skipping" in capsys.readouterr().out
    with pytest.raises(StageError, match=r"changed: lr\).*--force"):
        Stage(tmp_path, "sft", inputs={"lr": 2}).begin()
    assert Stage(tmp_path, "sft", inputs={"lr": 2}).begin(force=True)


def test_stage_never_overwrites_a_users_folder(tmp_path):
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "notes.txt").write_text("mine")
    with pytest.raises(StageError, match="not a moetune stage output"):
        Stage(tmp_path, "dpo", inputs={}).begin(force=True)
    assert (tmp_path / "dpo" / "notes.txt").read_text() == "mine"


def sft_stage(run_dir, lr):
    return Stage(run_dir, "sft", inputs={"lr": lr, "logging_steps": 1}, progress=("checkpoint-*",))


def test_interrupted_work_is_resumed_only_with_the_same_inputs(tmp_path):
    assert sft_stage(tmp_path, 1).begin()
    (tmp_path / ".sft.partial" / "checkpoint-2").mkdir()
    assert sft_stage(tmp_path, 1).begin()  # same inputs: the checkpoint is kept for resuming
    assert (tmp_path / ".sft.partial" / "checkpoint-2").is_dir()
    with pytest.raises(StageError, match=r"interrupted run made from different inputs \(changed: lr\) that saved "
                                         r"checkpoint-2.*--force"):
        sft_stage(tmp_path, 2).begin()
    assert sft_stage(tmp_path, 2).begin(force=True)
    assert not (tmp_path / ".sft.partial" / "checkpoint-2").exists()


def test_a_failed_attempt_without_progress_is_discarded_by_a_changed_run(tmp_path, capsys):
    assert sft_stage(tmp_path, 1).begin()
    (tmp_path / ".sft.partial" / "half-written.json").write_text("{")  # failed before its first checkpoint
    assert sft_stage(tmp_path, 2).begin()  # no --force needed
    assert "discarding" in capsys.readouterr().out and not (tmp_path / ".sft.partial" / "half-written.json").exists()


def test_save_and_log_schedules_are_not_inputs_of_a_training_stage():
    recipe = parse_recipe({**TINY, "sft": {"learning_rate": 1e-3, "save_steps": 5, "save_strategy": "steps",
                                           "logging_steps": 3}}, "r.yaml")
    assert recipe.trainer_inputs("sft") == {"learning_rate": 1e-3}


def test_relative_eval_files_start_at_the_recipe_folder(tmp_path, monkeypatch):
    from finetune.stages.evaluate import question_source, recipe_file

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "recipes"
    recipe = parse_recipe({**TINY, "eval": {"question_file": "q/questions.jsonl", "judge": {"prompt_file": "p.jsonl"}}},
                          str(folder / "mine.yaml"))
    assert question_source(recipe) == str(folder / "q" / "questions.jsonl")
    assert recipe_file(recipe, recipe.eval.judge.prompt_file) == folder / "p.jsonl"
    hub_questions = parse_recipe({**TINY, "eval": {"question_file": "HuggingFaceH4/mt_bench_prompts"}}, str(folder / "mine.yaml"))
    assert question_source(hub_questions) == "HuggingFaceH4/mt_bench_prompts"


def judged_stage(run_dir, judge):
    """eval's layout: answers depend on `answers` only, judgments on every input."""
    return Stage(run_dir, "eval", inputs={"answers": 1, "judge": judge}, progress=("answers/*", "judgments/*"),
                 progress_inputs={"answers/*": {"answers": 1}})


def test_work_that_does_not_depend_on_a_changed_input_is_kept(tmp_path, capsys):
    first = judged_stage(tmp_path, "a")
    assert first.begin()
    for name, text in (("answers/m.jsonl", "answer"), ("judgments/a.jsonl", "judgment"), ("scores.json", "{}")):
        (first.work / name).parent.mkdir(exist_ok=True)
        (first.work / name).write_text(text)
    # Interrupted work: the judgments were made by another judge; discarding them needs --force, answers stay.
    with pytest.raises(StageError, match=r"changed: judge\) that saved a.jsonl"):
        judged_stage(tmp_path, "b").begin()
    redo = judged_stage(tmp_path, "b")
    assert redo.begin(force=True)
    assert "keeping 1 saved files that do not depend on it (m.jsonl), discarding 1" in capsys.readouterr().out
    assert sorted(str(p.relative_to(redo.work)) for p in redo.work.rglob("*.*")) == [
        "answers/m.jsonl", "moetune_work_inputs.json"]
    redo.commit()
    # A finished stage redone for a new judge starts from the answers it made.
    again = judged_stage(tmp_path, "c")
    assert again.begin(force=True) and (again.work / "answers" / "m.jsonl").read_text() == "answer"
    assert not (again.work / "judgments").exists() and "reusing m.jsonl" in capsys.readouterr().out
