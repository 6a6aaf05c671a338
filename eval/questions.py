"""Questions in MT-Bench's format and their reference answers.

A question is {"question_id", "category", "turns": [user messages], optional "reference": [one per turn]}.
FastChat's question.jsonl reads unchanged, and so do single-turn sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.jsonl import read_jsonl


def load_questions(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Questions from a local .jsonl file, or from a hub dataset when `source` is not a local path."""
    path = Path(source)
    if path.is_file():
        rows = read_jsonl(path)
    elif path.suffix in (".jsonl", ".json") or path.is_absolute():
        raise FileNotFoundError(f"question file {path} does not exist.")
    else:
        from datasets import load_dataset

        rows = [dict(row) for row in load_dataset(str(source), split=split)]
    return [check_question(row, str(source)) for row in rows]


def check_question(row: dict[str, Any], source: str) -> dict[str, Any]:
    missing = [key for key in ("question_id", "category", "turns") if key not in row]
    if missing:
        raise ValueError(f"{source}: question {row.get('question_id', '?')} lacks {', '.join(missing)} (MT-Bench format).")
    if not row["turns"]:
        raise ValueError(f"{source}: question {row['question_id']} has no turns.")
    return row


def load_reference_answers(path: str | Path | None) -> dict[Any, list[str]]:
    """question_id -> reference turns, from a file in FastChat's answer format (reference_answer/gpt-4.jsonl)."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise FileNotFoundError(f"reference answer file {path} does not exist.")
    return {row["question_id"]: row["choices"][0]["turns"] for row in read_jsonl(path)}


def reference_turns(question: dict[str, Any], reference_answers: dict[Any, list[str]]) -> list[str] | None:
    """The reference answers of a question: the reference file's, else the question's own `reference` list."""
    return reference_answers.get(question["question_id"]) or question.get("reference") or None
