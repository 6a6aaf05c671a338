"""Questions in MT-Bench's format and their reference answers.

A question is {"question_id", "category", "turns": [user messages], optional "reference": [one per turn]}.
FastChat's question.jsonl reads unchanged, and so do single-turn sets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import load_dataset

from finetune.config.evaluation import EvalInputError

FORMAT_HINT = 'one JSON object per line: {"question_id": 1, "category": "writing", "turns": ["..."]} (MT-Bench format)'


def load_questions(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Questions from a local .jsonl file, or from a hub dataset when `source` is not a local path."""
    path = Path(source)
    if path.is_file():
        rows = read_object_lines(path)
    elif path.suffix in (".jsonl", ".json") or path.is_absolute():
        raise EvalInputError(f"question file {path} does not exist. Fix eval.question_file (relative paths start at "
                            f"the recipe's folder), or leave it unset to use the questions of the prep stage.")
    else:
        rows = [(f"{source}[{split}] row {i}", dict(row)) for i, row in enumerate(load_dataset(str(source), split=split))]
    if not rows:
        raise EvalInputError(f"{source} holds no questions; expected {FORMAT_HINT}.")
    return [check_question(row, location) for location, row in rows]


def read_object_lines(path: Path, hint: str = FORMAT_HINT) -> list[tuple[str, dict[str, Any]]]:
    """(file:line, row) for every non-blank line; a line that is not a JSON object fails naming it."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        location = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalInputError(f"{location}: not valid JSON ({error.msg} at column {error.colno}); expected "
                                f"{hint}.") from None
        if not isinstance(row, dict):
            raise EvalInputError(f"{location}: expected {hint}, got a {type(row).__name__}.")
        rows.append((location, row))
    return rows


def check_question(row: dict[str, Any], location: str) -> dict[str, Any]:
    missing = [key for key in ("question_id", "category", "turns") if key not in row]
    if missing:
        raise EvalInputError(f"{location}: question {row.get('question_id', '?')} lacks {', '.join(missing)}; "
                            f"expected {FORMAT_HINT}.")
    turns = row["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(turn, str) for turn in turns):
        raise EvalInputError(f"{location}: question {row['question_id']}: turns must be a non-empty list of user "
                            f"messages (strings), got {turns!r:.80}.")
    return row


def load_reference_answers(path: str | Path | None) -> dict[Any, list[str]]:
    """question_id -> reference turns, from a file in FastChat's answer format (reference_answer/gpt-4.jsonl)."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise EvalInputError(f"reference answer file {path} does not exist; fix eval.judge.reference_answer_file "
                             f"(relative to the recipe's folder) or remove it.")
    answers = {}
    for location, row in read_object_lines(Path(path), REFERENCE_HINT):
        try:
            answers[row["question_id"]] = row["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            raise EvalInputError(f"{location}: a reference answer needs question_id and choices[0].turns; expected "
                                 f"{REFERENCE_HINT}.") from None
    return answers


REFERENCE_HINT = ('one JSON object per line: {"question_id": 1, "choices": [{"turns": ["..."]}]} (FastChat\'s '
                  'reference_answer format)')


def reference_turns(question: dict[str, Any], reference_answers: dict[Any, list[str]]) -> list[str] | None:
    """The reference answers of a question: the reference file's, else the question's own `reference` list."""
    return reference_answers.get(question["question_id"]) or question.get("reference") or None
