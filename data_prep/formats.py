"""Converters: each source format turned into the normalized schema (see validate.py).

A converter takes the source's rows in order and yields Examples, or Problems for rows it cannot use. Most formats
convert one row at a time (`per_row`); OpenAssistant trees and on-policy sampling look at several rows together.
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable, Iterator

from finetune.core import synthetic_task
from finetune.config.data import FORMATS, SourceConfig
from data_prep.oasst import oasst_examples
from data_prep.onpolicy import on_policy_pairs
from data_prep.records import Dropped, Example, Problem, Row, RowError

Item = Example | Problem
Converter = Callable[[Iterator[Row], SourceConfig, int], Iterator[Item]]
RowConverter = Callable[[dict[str, Any], dict[str, Any], random.Random], list[tuple[str, dict]]]


def per_row(convert: RowConverter) -> Converter:
    """Lift a one-row converter to a stream converter that reports unreadable, malformed and dropped rows."""

    def stream(rows: Iterator[Row], source: SourceConfig, seed: int) -> Iterator[Item]:
        rng = random.Random(f"{source.format}/{seed}")
        for row in rows:
            if row.error is not None:
                yield Problem(row.location, row.error)
                continue
            try:
                outputs = convert(row.data, source.options, rng)
            except RowError as error:
                yield Problem(row.location, str(error))
                continue
            except Dropped as drop:
                yield Problem(row.location, str(drop), malformed=False)
                continue
            for kind, output in outputs:
                yield Example(kind, output, row.location)

    return stream


def require(row: dict[str, Any], field: str) -> Any:
    if row.get(field) is None:
        raise RowError(f"missing field '{field}' (rename a column with the source's 'columns' option)")
    return row[field]


def as_messages(value: Any, role: str, field: str) -> list[dict[str, str]]:
    """Plain text becomes one message of `role`; a list is taken as messages (checked later)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise RowError(f"'{field}' must be text or a list of messages, got {type(value).__name__}")


def pair(prompt: list, chosen: list, rejected: list) -> tuple[str, dict]:
    return "preference", {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def split_at_shared_prompt(chosen: list, rejected: list) -> tuple[str, dict]:
    """Two full conversations that share their start: the prompt is the shared part up to its last user turn."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and not (isinstance(chosen[shared - 1], dict) and chosen[shared - 1].get("role") == "user"):
        shared -= 1
    if shared == 0:
        raise RowError("chosen and rejected share no user turn, so there is no common prompt to split at")
    return pair(chosen[:shared], chosen[shared:], rejected[shared:])


def convert_sft(row: dict, options: dict, rng: random.Random) -> list[tuple[str, dict]]:
    return [("sft", {"messages": require(row, "messages")})]


def convert_preference(row: dict, options: dict, rng: random.Random) -> list[tuple[str, dict]]:
    """TRL's preference formats: explicit prompt (text or messages), or conversational chosen/rejected only."""
    chosen, rejected = require(row, "chosen"), require(row, "rejected")
    if row.get("prompt") is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise RowError("missing field 'prompt' (plain-text pairs need one; Human/Assistant transcripts use format hh_rlhf)")
        return [split_at_shared_prompt(chosen, rejected)]
    prompt = as_messages(row["prompt"], "user", "prompt")
    return [pair(prompt, as_messages(chosen, "assistant", "chosen"), as_messages(rejected, "assistant", "rejected"))]


HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_SPEAKERS = {role: speaker for speaker, role in HH_ROLES.items()}


def parse_transcript(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> messages; the one space after each colon is not content."""
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) == 1:
        raise RowError("transcript must start with '\\n\\nHuman:'")
    return [{"role": HH_ROLES[speaker], "content": body[1:] if body.startswith(" ") else body}
            for speaker, body in zip(parts[1::2], parts[2::2])]


def render_transcript(messages: list[dict[str, str]]) -> str:
    """The inverse of parse_transcript."""
    return "".join(f"\n\n{HH_SPEAKERS[m['role']]}: {m['content']}" for m in messages)


def convert_hh_rlhf(row: dict, options: dict, rng: random.Random) -> list[tuple[str, dict]]:
    """Anthropic hh-rlhf: full chosen/rejected transcripts, or a transcript prompt plus the two continuations."""
    prompt, chosen, rejected = row.get("prompt", ""), require(row, "chosen"), require(row, "rejected")
    if not all(isinstance(text, str) for text in (prompt, chosen, rejected)):
        raise RowError("hh_rlhf fields 'prompt', 'chosen' and 'rejected' must be text")
    return [split_at_shared_prompt(parse_transcript(prompt + chosen), parse_transcript(prompt + rejected))]



def convert_scored(row: dict, options: dict, rng: random.Random) -> list[tuple[str, dict]]:
    """UltraFeedback-style: a prompt and scored completions, binarized into best vs worst (or a random lower one)."""
    prompt = as_messages(require(row, "prompt"), "user", "prompt")
    scored = scored_completions(require(row, "completions"), options)
    best_score, best_text = scored[0]
    lower = [(score, text) for score, text in scored if score < best_score]
    if not lower:
        raise Dropped("tie")
    if options.get("pairing", "best_vs_worst") == "best_vs_worst":
        other_score, other_text = lower[-1]
    else:
        other_score, other_text = rng.choice(lower)
    if best_score - other_score < float(options.get("min_margin", 0.0)):
        raise Dropped("small_margin")
    return [pair(prompt, as_messages(best_text, "assistant", "completion"), as_messages(other_text, "assistant", "completion"))]


def scored_completions(completions: Any, options: dict) -> list[tuple[float, Any]]:
    """(score, text) pairs, best first; ties keep their order in the row so the result is deterministic."""
    text_key, score_key = options.get("text_key", "text"), options.get("score_key", "score")
    if not isinstance(completions, list) or len(completions) < 2:
        raise RowError("'completions' must be a list of at least 2 scored completions")
    scored = []
    for number, completion in enumerate(completions, start=1):
        if not isinstance(completion, dict) or not isinstance(completion.get(score_key), (int, float)):
            raise RowError(f"completion {number} needs a numeric '{score_key}' (set options.score_key)")
        scored.append((float(completion[score_key]), completion.get(text_key)))
    return sorted(scored, key=lambda item: -item[0])


def generate_synthetic(rows: Iterator[Row], source: SourceConfig, seed: int) -> Iterator[Item]:
    """The built-in demo task: options {sft: N, pairs: N, questions: N}."""
    counts = {name: int(source.options.get(name, 0)) for name in ("sft", "pairs", "questions")}
    generators = (("sft", synthetic_task.sft_conversations(counts["sft"], seed)),
                  ("preference", synthetic_task.preference_pairs(counts["pairs"], seed)),
                  ("question", synthetic_task.questions(counts["questions"], seed)))
    for kind, rows_of_kind in generators:
        for index, row in enumerate(rows_of_kind):
            yield Example(kind, row, f"synthetic {kind} #{index}")


CONVERTERS: dict[str, Converter] = {
    "sft": per_row(convert_sft),
    "preference": per_row(convert_preference),
    "hh_rlhf": per_row(convert_hh_rlhf),
    "scored": per_row(convert_scored),
    "oasst": oasst_examples,
    "onpolicy": on_policy_pairs,
    "synthetic": generate_synthetic,
}
assert tuple(CONVERTERS) == FORMATS, "data_prep/config.py's FORMATS names the converters"


def sft_from_chosen(example: Example) -> Example:
    """The SFT conversation a preference pair implies: its prompt followed by the chosen reply."""
    row = example.row
    return Example("sft", {"messages": row["prompt"] + row["chosen"]}, example.location)
