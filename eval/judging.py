"""Making the judgments an eval needs, single or pairwise, and saving each in FastChat's judgment format.

Judgments already in the judgment file are not asked for again. A judge call that fails for good is written to
the error file and counted per model; it is not a judgment, so the next run asks for it again.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

from eval.judge_prompts import pair_prompt, parse_rating, parse_verdict, single_prompt, usable_reference
from eval.judge_backends import JudgeResult, programmatic_judgment
from eval.jsonl import append_jsonl, read_jsonl

Question = dict[str, Any]
Answers = dict[str, dict[Any, list[str]]]  # model -> question_id -> answer turns


@dataclass
class JudgingContext:
    """What every judgment needs besides the judge itself."""

    questions: list[Question]
    answers: Answers
    references: dict[Any, list[str] | None]  # question_id -> reference turns
    reference_categories: list[str]
    prompts: dict[str, dict[str, Any]]  # FastChat judge prompts by name (empty for the programmatic judge)
    judge_name: str
    judgment_file: Path
    error_file: Path

    def reference(self, question: Question, turn: int) -> list[str] | None:
        return usable_reference(question, self.references[question["question_id"]], turn, self.reference_categories)

    def record_error(self, model: str, question: Question, turn: int, error: str) -> None:
        append_jsonl(self.error_file, [{"question_id": question["question_id"], "model": model, "turn": turn,
                                        "judge": self.judge_name, "error": error, "tstamp": time.time()}])


def with_progress(results: Iterator[JudgeResult], total: int) -> Iterator[JudgeResult]:
    """The judge's results, counted on a progress bar that also shows how many judge calls failed so far."""
    failed = 0
    with tqdm(total=total, desc="[eval] judging", unit="call", disable=total == 0, dynamic_ncols=True) as bar:
        for result in results:
            failed += result[2] is not None
            bar.set_postfix(errors=failed, refresh=False)
            bar.update(1)
            yield result


def judged_turns(question: Question) -> list[int]:
    """Turn 1 always; turn 2 (judged on the whole conversation) for two-turn questions, as in MT-Bench."""
    return [1, 2] if len(question["turns"]) >= 2 else [1]


def judge_programmatic(context: JudgingContext, models: list[str]) -> Counter:
    done = {(r["question_id"], r["model"], r["turn"]) for r in read_jsonl(context.judgment_file)}
    records = []
    for question in context.questions:
        qid = question["question_id"]
        reference = context.references[qid]
        for model in models:
            for turn in judged_turns(question):
                if (qid, model, turn) in done:
                    continue
                answer = context.answers[model][qid][turn - 1]
                score, judgment = programmatic_judgment(question["category"], answer, reference and reference[turn - 1])
                records.append({"question_id": qid, "model": model, "judge": [context.judge_name, "synthetic-v1"],
                                "user_prompt": "", "judgment": judgment, "score": score, "turn": turn,
                                "tstamp": time.time()})
    append_jsonl(context.judgment_file, records)
    return Counter()


def judge_single(judge: Any, context: JudgingContext, models: list[str]) -> Counter:
    """Rate every model's answers 1-10; returns the number of failed judge calls per model."""
    done = {(r["question_id"], r["model"], r["turn"]) for r in read_jsonl(context.judgment_file)}
    tasks = [(question, model, turn) for question in context.questions for model in models
             for turn in judged_turns(question) if (question["question_id"], model, turn) not in done]
    prompts = [single_prompt(context.prompts, question, context.answers[model][question["question_id"]], turn,
                             context.reference(question, turn)) for question, model, turn in tasks]
    errors: Counter = Counter()
    for index, judgment, error in with_progress(judge.complete_many(prompts), len(prompts)):
        question, model, turn = tasks[index]
        if error is not None:
            errors[model] += 1
            context.record_error(model, question, turn, error)
            continue
        append_jsonl(context.judgment_file, [{
            "question_id": question["question_id"], "model": model,
            "judge": [context.judge_name, prompts[index].template], "user_prompt": prompts[index].user,
            "judgment": judgment, "score": parse_rating(judgment), "turn": turn, "tstamp": time.time(),
        }])
    return errors


# Who won, from each game's verdict: game 1 shows the model as A, game 2 shows the baseline as A.
GAME_1_WINNER = {"A": "model_1", "B": "model_2"}
GAME_2_WINNER = {"A": "model_2", "B": "model_1"}


def judge_pairwise(judge: Any, context: JudgingContext, models: list[str], baseline: str) -> Counter:
    """Compare every model with the baseline in both orders; returns failed comparisons per model."""
    done = {(r["question_id"], r["model_1"], r["turn"]) for r in read_jsonl(context.judgment_file)}
    tasks = [(question, model, turn) for question in context.questions for model in models if model != baseline
             for turn in judged_turns(question) if (question["question_id"], model, turn) not in done]
    prompts = []
    for question, model, turn in tasks:
        qid = question["question_id"]
        ours, theirs = context.answers[model][qid], context.answers[baseline][qid]
        reference = context.reference(question, turn)
        prompts.append(pair_prompt(context.prompts, question, ours, theirs, turn, reference))
        prompts.append(pair_prompt(context.prompts, question, theirs, ours, turn, reference))
    judgments: dict[int, dict[int, str]] = {}  # task index -> game (0 or 1) -> judgment text
    failed: set[int] = set()
    errors: Counter = Counter()
    for index, judgment, error in with_progress(judge.complete_many(prompts), len(prompts)):
        task, game = divmod(index, 2)
        question, model, turn = tasks[task]
        if error is not None:
            if task not in failed:
                failed.add(task)
                errors[model] += 1
                context.record_error(model, question, turn, error)
            continue
        judgments.setdefault(task, {})[game] = judgment
        # A comparison is saved only when both orders are judged: one order alone decides nothing.
        if len(judgments[task]) == 2:
            record = pair_record(context, tasks[task], baseline, prompts[2 * task:2 * task + 2], judgments[task])
            append_jsonl(context.judgment_file, [record])
    return errors


def pair_record(context: JudgingContext, task: tuple, baseline: str, prompts: list, judgments: dict[int, str]) -> dict:
    """A comparison in FastChat's pairwise judgment format; model_1 is the model, model_2 the baseline."""
    question, model, turn = task
    verdicts = parse_verdict(judgments[0]), parse_verdict(judgments[1])
    return {
        "question_id": question["question_id"], "model_1": model, "model_2": baseline,
        "g1_winner": GAME_1_WINNER.get(verdicts[0], verdicts[0]),
        "g2_winner": GAME_2_WINNER.get(verdicts[1], verdicts[1]),
        "judge": [context.judge_name, prompts[0].template],
        "g1_user_prompt": prompts[0].user, "g1_judgment": judgments[0],
        "g2_user_prompt": prompts[1].user, "g2_judgment": judgments[1],
        "turn": turn, "tstamp": time.time(),
    }
