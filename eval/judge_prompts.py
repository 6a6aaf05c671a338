"""MT-Bench grading: which judge prompt a judgment uses, the exact prompt text, and reading the verdict.

Prompts come from a file in FastChat's judge_prompts.jsonl format, so users can bring their own. As in FastChat,
turn 1 is judged on the first answer alone and turn 2 on the whole two-turn conversation; questions of the
reference categories (math, reasoning, coding) use the reference-guided prompts when a reference exists.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config.evaluation import EvalInputError
from eval.questions import read_object_lines

RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")
UNPARSEABLE = -1


@dataclass(frozen=True)
class JudgePrompt:
    template: str  # the judge prompt's name, e.g. single-math-v1-multi-turn
    system: str
    user: str


def load_judge_prompts(path: str | Path) -> dict[str, dict[str, Any]]:
    if not Path(path).is_file():
        raise EvalInputError(f"judge prompt file {path} does not exist; fix eval.judge.prompt_file (relative to the "
                             f"recipe's folder; FastChat's judge_prompts.jsonl format).")
    prompts = {}
    for location, row in read_object_lines(Path(path), PROMPT_HINT):
        if not all(isinstance(row.get(key), str) for key in PROMPT_KEYS):
            raise EvalInputError(f"{location}: a judge prompt needs {', '.join(PROMPT_KEYS)} (text); expected "
                                 f"{PROMPT_HINT}.")
        prompts[row["name"]] = row
    return prompts


PROMPT_KEYS = ("name", "system_prompt", "prompt_template")
PROMPT_HINT = "FastChat's judge_prompts.jsonl format: one JSON object per line with " + ", ".join(PROMPT_KEYS)


def template_name(kind: str, with_reference: bool, turn: int) -> str:
    """FastChat's names: single-v1, single-math-v1, pair-v2, pair-math-v1, each with a -multi-turn variant."""
    names = {"single": ("single-v1", "single-math-v1"), "pairwise": ("pair-v2", "pair-math-v1")}
    name = names[kind][with_reference]
    return f"{name}-multi-turn" if turn == 2 else name


def usable_reference(
    question: dict[str, Any], reference: list[str] | None, turn: int, reference_categories: list[str]
) -> list[str] | None:
    """The reference turns when this judgment is reference-guided, else None."""
    if question["category"] in reference_categories and reference is not None and len(reference) >= turn:
        return reference
    return None


def question_fields(question: dict[str, Any], turn: int, reference: list[str] | None) -> dict[str, str]:
    turns = question["turns"]
    fields = {"question": turns[0]} if turn == 1 else {"question_1": turns[0], "question_2": turns[1]}
    if reference is not None:
        fields.update({f"ref_answer_{i + 1}": reference[i] for i in range(turn)})
    return fields


def answer_fields(name: str, answer_turns: list[str], turn: int) -> dict[str, str]:
    """`answer` (turn 1) or `answer_1`, `answer_2` (turn 2); pairwise names are answer_a, answer_b."""
    if turn == 1:
        return {name: answer_turns[0]}
    return {f"{name}_1": answer_turns[0], f"{name}_2": answer_turns[1]}


def build_prompt(prompts: dict[str, dict[str, Any]], name: str, fields: dict[str, str]) -> JudgePrompt:
    if name not in prompts:
        raise KeyError(f"the judge prompt file has no prompt named {name!r} (has: {', '.join(sorted(prompts))}).")
    template = prompts[name]
    return JudgePrompt(name, template["system_prompt"], template["prompt_template"].format(**fields))


def single_prompt(
    prompts: dict[str, dict[str, Any]],
    question: dict[str, Any],
    answer_turns: list[str],
    turn: int,
    reference: list[str] | None,
) -> JudgePrompt:
    """The prompt rating one model's answer at `turn` (reference: from usable_reference)."""
    fields = question_fields(question, turn, reference) | answer_fields("answer", answer_turns, turn)
    return build_prompt(prompts, template_name("single", reference is not None, turn), fields)


def pair_prompt(
    prompts: dict[str, dict[str, Any]],
    question: dict[str, Any],
    answer_a: list[str],
    answer_b: list[str],
    turn: int,
    reference: list[str] | None,
) -> JudgePrompt:
    """The prompt comparing assistant A's and B's answers at `turn`."""
    fields = question_fields(question, turn, reference)
    fields |= answer_fields("answer_a", answer_a, turn) | answer_fields("answer_b", answer_b, turn)
    return build_prompt(prompts, template_name("pairwise", reference is not None, turn), fields)


def parse_rating(judgment: str) -> int | float:
    """The `[[rating]]` of a judgment, falling back to `[rating]` as FastChat does; -1 when there is none."""
    match = RATING.search(judgment) or RATING_FALLBACK.search(judgment)
    return ast.literal_eval(match.group(1)) if match else UNPARSEABLE


def parse_verdict(judgment: str) -> str:
    """A, B, tie ([[C]]) or error, checked in FastChat's order."""
    for mark, verdict in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if mark in judgment:
            return verdict
    return "error"
