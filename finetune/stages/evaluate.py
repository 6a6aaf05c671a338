"""The eval stage: every model answers the questions, a judge grades the answers, and a report compares them.

run_dir/eval/ ends up holding, in FastChat's layout, model_answer/<model>.jsonl and
model_judgment/<judge>_{single,pair}.jsonl, plus scores.json, scores.md and (single mode) radar.png.
Answers and judgments are appended as they are made in run_dir/.eval.partial/, so a re-run after a crash or
after failed judge calls only does what is missing. While any judge call has failed the stage is not committed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from eval.answer import answer_questions, unanswered
from finetune.config.evaluation import JUDGE_CALL_SETTINGS, EvalInputError
from eval.judge_prompts import load_judge_prompts
from eval.judge_backends import JudgeUnreachable, LocalJudge, OpenAICompatibleJudge, programmatic_can_score
from eval.judging import JudgingContext, judge_pairwise, judge_programmatic, judge_single
from eval.questions import load_questions, load_reference_answers, reference_turns
from eval.jsonl import file_safe, read_jsonl
from eval.scores import markdown_table, pairwise_rows, pairwise_scores, radar_plot, single_rows, single_scores
from finetune.core import remote_files
from finetune.modeling.loading import BASE_MODEL, load_for_inference
from finetune.config.recipe import Recipe
from finetune.core.remote_files import fetch, is_url
from finetune.core.rundir import (
    Interrupted, MissingStageOutput, Stage, StageError, file_digest, read_manifest, write_json_atomic)


def question_source(recipe: Recipe) -> str:
    """The question file (relative to the recipe's folder, or a URL), a hub dataset id, or the prep stage's questions."""
    name = recipe.eval.question_file
    if name is None:
        return str(recipe.run_path / "data" / "questions.jsonl")
    if is_url(name):
        return str(fetch(name))
    local = recipe.base_dir / name
    return str(local) if local.exists() or local.suffix in (".jsonl", ".json") else name


def recipe_file(recipe: Recipe, name: str | None) -> Path | None:
    """A file named in `eval:`: a URL (downloaded once) or a path relative to the recipe's folder, as in `data:`."""
    return None if name is None else remote_files.recipe_file(name, recipe.base_dir)


def source_fingerprint(source: str) -> str:
    """A local file's content hash (the same file elsewhere is the same input), else the hub id itself."""
    path = Path(source)
    return file_digest(path) if path.is_file() else source


# What an answer is made from: the models, the questions, the seed and these keys of eval:. A new judge (model,
# prompts, mode) is judged again from the saved answers.
ANSWER_KEYS = ("question_split", "max_new_tokens", "batch_size", "temperatures")
# Where the judge is and how it is called: not inputs of anything, so a dead judge's base_url or key variable can
# be fixed and the same command resumes with every saved answer and judgment.
NOT_INPUTS = ("base_url", "api_key_env", *JUDGE_CALL_SETTINGS)


def stage_inputs(recipe: Recipe, needed: dict[str, dict] | None = None) -> dict[str, Any]:
    """What the eval depends on: the section (but where and how the judge is called), the seed, the questions and
    each model's producing stage."""
    section = recipe.section_dict("eval")
    section["judge"] = {key: value for key, value in section["judge"].items() if key not in NOT_INPUTS}
    return {"eval": section, **answer_inputs(recipe, needed or {})}


def answer_inputs(recipe: Recipe, needed: dict[str, dict]) -> dict[str, Any]:
    """What the saved answers depend on (the judge is not part of it)."""
    models = {}
    for name in recipe.eval.models:
        models[name] = needed[name]["fingerprint"] if name in needed else name
    section = recipe.section_dict("eval")
    return {"answering": {key: section[key] for key in ANSWER_KEYS}, "seed": recipe.seed, "models": models,
            "questions": source_fingerprint(question_source(recipe))}


def check_files(recipe: Recipe) -> None:
    """The files `eval:` names exist (checked before any stage runs); the prep stage's questions may come later."""
    judge = recipe.eval.judge
    named = {"eval.judge.prompt_file": judge.prompt_file, "eval.judge.reference_answer_file": judge.reference_answer_file}
    for key, name in named.items():
        if name is not None and not is_url(name) and not recipe_file(recipe, name).is_file():
            raise EvalInputError(f"{recipe.source}: {key}: {recipe_file(recipe, name)} does not exist; fix the path "
                                 f"(relative to the recipe's folder).")
    if recipe.eval.question_file is not None and not is_url(recipe.eval.question_file):
        local = Path(question_source(recipe))
        if not local.is_file() and (local.suffix in (".jsonl", ".json") or Path(recipe.eval.question_file).is_absolute()):
            raise EvalInputError(f"{recipe.source}: eval.question_file: {local} does not exist; fix the path (relative "
                                 f"to the recipe's folder), or leave it unset to use the questions of the prep stage.")


def refuse_unscorable(recipe: Recipe, questions: list[dict[str, Any]]) -> None:
    """The programmatic judge checks only the synthetic task's answers: refuse other questions before answering."""
    if recipe.eval.judge.type != "programmatic":
        return
    references = load_reference_answers(recipe_file(recipe, recipe.eval.judge.reference_answer_file))
    bad = [q for q in questions if not programmatic_can_score(q, reference_turns(q, references))]
    if bad:
        raise EvalInputError(
            f"{question_source(recipe)}: the programmatic judge cannot score {len(bad)} of {len(questions)} questions "
            f"(e.g. question {bad[0]['question_id']}, category {bad[0]['category']!r}): it checks only the synthetic "
            f"task's categories against a reference. Use a model judge (eval.judge.type: openai or local, with "
            f"eval.judge.prompt_file) for these questions.")


def read_questions(recipe: Recipe) -> list[dict[str, Any]]:
    """The questions eval answers, every one checked (the preflight reads them before any training, too)."""
    if recipe.eval.question_file is None and not Path(question_source(recipe)).is_file():
        if read_manifest(recipe.run_path / "data") is None:
            raise MissingStageOutput(recipe.run_path / "data", "eval")  # its questions are the prep stage's
        raise EvalInputError(f"[eval] {question_source(recipe)} does not exist: the prep stage made no eval "
                             f"questions (the synthetic source makes them). Set eval.question_file to questions "
                             f"in MT-Bench's format, e.g. FastChat's mt_bench/question.jsonl.")
    questions = load_questions(question_source(recipe), recipe.eval.question_split)
    refuse_unscorable(recipe, questions)
    return questions


def run(recipe: Recipe, needed: dict[str, dict] | None = None, force: bool | str = False) -> Path:
    """Run the eval stage; returns run_dir/eval, or the work folder while some judge calls have failed. It needs no
    earlier stage but the stages eval.models names (`needed`: their manifests, checked by the registry); the other
    models it names are loaded, or refused, by name."""
    needed = needed or {}
    config = recipe.eval
    check_files(recipe)
    questions = read_questions(recipe)
    stage = Stage(recipe.run_path, "eval", inputs=stage_inputs(recipe, needed),
                  progress=("model_answer/*.jsonl", "model_judgment/*.jsonl"),
                  progress_inputs={"model_answer/*.jsonl": answer_inputs(recipe, needed)})
    if not stage.begin(force):
        print((stage.final / "scores.md").read_text().strip(), flush=True)  # what a finished eval has to say
        return stage.final
    try:
        load = model_loader(recipe, needed)
        answers = {name: answer_model(recipe, name, questions, stage.work, load) for name in config.models}
        errors, scores_file = judge_and_report(recipe, questions, answers, stage.work, load)
    except KeyboardInterrupt:
        raise Interrupted(f"[eval] interrupted. The answers and judgments finished so far are saved in {stage.work}; "
                          f"run the same command again to continue from them.") from None
    except JudgeUnreachable as error:
        raise StageError(f"[eval] {error} The answers and judgments finished so far are saved in {stage.work}; run "
                         f"the same command again once the judge is up.") from None
    if errors:
        print(f"[eval] {errors} judge calls failed (see {stage.work / 'judge_errors.jsonl'}); the stage stays "
              f"unfinished in {stage.work}. Run it again to retry only those judgments.")
        return stage.work
    return stage.commit({"scores": scores_file.name})


def model_loader(recipe: Recipe, needed: dict[str, dict]) -> Callable[[str], tuple[Any, Any]]:
    """(model, tokenizer) for a name eval reads: one of this run's stages (those the registry checked, and the
    recipe's base model), else a local path or hub id."""
    return lambda name: load_for_inference(recipe.model_source, name, of_this_run=name in needed or name == BASE_MODEL)


def answer_model(recipe: Recipe, name: str, questions: list[dict[str, Any]], work: Path,
                 load: Callable[[str], tuple[Any, Any]]) -> dict[Any, list[str]]:
    """The model's answers by question_id, generating only the missing ones (the model loads only if needed)."""
    config = recipe.eval
    answer_file = work / "model_answer" / f"{file_safe(name)}.jsonl"
    pending = unanswered(questions, answer_file)
    if pending:
        model, tokenizer = load(name)
        answer_questions(model, tokenizer, name, pending, answer_file, temperatures=config.temperatures,
                         max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, seed=recipe.seed)
    return {record["question_id"]: record["choices"][0]["turns"] for record in read_jsonl(answer_file)}


def make_judge(recipe: Recipe, load: Callable[[str], tuple[Any, Any]]) -> Any:
    judge = recipe.eval.judge
    if judge.type == "openai":
        return OpenAICompatibleJudge(judge)
    return LocalJudge(lambda: load(judge.model), judge.max_tokens,
                      recipe.eval.batch_size)


def judge_and_report(recipe: Recipe, questions: list[dict[str, Any]], answers: dict, work: Path,
                     load: Callable[[str], tuple[Any, Any]]) -> tuple[int, Path]:
    """Make the missing judgments, then write and print the report. Returns (failed judge calls, scores file)."""
    config = recipe.eval
    judge = config.judge
    judge_name = "programmatic" if judge.type == "programmatic" else file_safe(judge.model)
    mode_suffix = "pair" if judge.mode == "pairwise" else "single"
    reference_answers = load_reference_answers(recipe_file(recipe, judge.reference_answer_file))
    context = JudgingContext(
        questions=questions,
        answers=answers,
        references={q["question_id"]: reference_turns(q, reference_answers) for q in questions},
        reference_categories=judge.reference_categories,
        prompts=load_judge_prompts(recipe_file(recipe, judge.prompt_file)) if judge.prompt_file else {},
        judge_name=judge_name,
        judgment_file=work / "model_judgment" / f"{judge_name}_{mode_suffix}.jsonl",
        error_file=work / "judge_errors.jsonl",
    )
    if judge.type == "programmatic":
        errors = judge_programmatic(context, config.models)
    elif judge.mode == "pairwise":
        errors = judge_pairwise(make_judge(recipe, load), context, config.models, judge.baseline)
    else:
        errors = judge_single(make_judge(recipe, load), context, config.models)
    judgments = read_jsonl(context.judgment_file)
    if judge.mode == "pairwise":
        scores = pairwise_scores(judgments, config.models, judge.baseline, errors)
        table = markdown_table(f"vs {judge.baseline}", list(scores), pairwise_rows(scores))
    else:
        scores = single_scores(judgments, questions, config.models, errors)
        table = markdown_table("score", list(scores), single_rows(scores))
        radar_plot(scores, work / "radar.png")
    scores_file = work / "scores.json"
    write_json_atomic(scores_file, {"mode": judge.mode, "judge": judge_name, "models": scores})
    (work / "scores.md").write_text(f"# MT-Bench-style scores (judge: {judge_name}, {judge.mode})\n\n{table}\n")
    print(table, flush=True)
    return sum(errors.values()), scores_file
