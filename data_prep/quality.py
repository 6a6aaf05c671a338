"""Quality filters applied to every converted example, each drop counted by its reason.

Order: chosen identical to rejected, exact duplicate, duplicate normalized prompt, contamination with eval
questions, over-length. Duplicate checks keep 16-byte hashes only, so memory grows by bytes per row, not rows.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from finetune.config.data import DataConfig
from data_prep.records import DataError, Example
from finetune.core.remote_files import recipe_file

WORD = re.compile(r"\w+")


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def normalized_text(messages: list[dict[str, str]]) -> str:
    """Lower case words only: 'Hello,  World!' and 'hello world' are the same prompt."""
    return "\n".join(f"{m['role']}: {' '.join(WORD.findall(m['content'].lower()))}" for m in messages)


def prompt_of(example: Example) -> list[dict[str, str]]:
    """What the model is asked: the preference prompt, or an SFT conversation without its last reply."""
    row = example.row
    return row["prompt"] if example.kind == "preference" else row["messages"][:-1]


def user_text(example: Example) -> Iterable[str]:
    row = example.row
    messages = row["prompt"] if example.kind == "preference" else row["messages"]
    return (m["content"] for m in messages if m["role"] == "user")


class Decontaminator:
    """Share of an eval question turn's word n-grams found in a training row's user text (the highest over turns)."""

    def __init__(self, question_files: list[Path], ngram: int):
        self.ngram = ngram
        self.turns_by_ngram: dict[tuple, set[int]] = defaultdict(set)
        self.turn_sizes: list[int] = []
        for path in question_files:
            for turn in question_turns(path):
                grams = self.ngrams(turn)
                for gram in grams:
                    self.turns_by_ngram[gram].add(len(self.turn_sizes))
                self.turn_sizes.append(len(grams))

    def ngrams(self, text: str) -> set[tuple]:
        words = WORD.findall(text.lower())
        return {tuple(words[i:i + self.ngram]) for i in range(len(words) - self.ngram + 1)}

    def overlap(self, texts: Iterable[str]) -> float:
        grams = set().union(*(self.ngrams(text) for text in texts))
        hits: Counter = Counter()
        for gram in grams:
            hits.update(self.turns_by_ngram.get(gram, ()))
        return max((count / self.turn_sizes[turn] for turn, count in hits.items()), default=0.0)


def question_turns(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: eval question file not found; fix data.decontamination.question_files.")
    turns = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    turns.extend(json.loads(line)["turns"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{number}: not an MT-Bench question (a JSON object with 'turns').") from None
    return turns


class TokenLengths:
    """Token counts after chat templating, measured with the model's tokenizer; exact percentiles from counters."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def count(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> int:
        # transformers 5 returns a BatchEncoding here (input_ids, attention_mask), not a list of ids.
        encoded = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        return len(encoded["input_ids"])

    def measure(self, example: Example) -> dict[str, int]:
        """Lengths of the parts and `total`, the longest templated sequence the example makes."""
        row = example.row
        if example.kind == "sft":
            total = self.count(row["messages"])
            return {"messages": total, "total": total}
        prompt = self.count(row["prompt"], add_generation_prompt=True)
        chosen = self.count(row["prompt"] + row["chosen"])
        rejected = self.count(row["prompt"] + row["rejected"])
        return {"prompt": prompt, "chosen": chosen - prompt, "rejected": rejected - prompt, "total": max(chosen, rejected)}

    def record(self, lengths: dict[str, int]) -> None:
        for part, length in lengths.items():
            if part != "total":
                self.counts[part][length] += 1

    def percentiles(self) -> dict[str, dict[str, int]]:
        return {part: percentiles(counter) for part, counter in sorted(self.counts.items())}


def percentiles(counter: Counter, points: tuple[int, ...] = (50, 90, 99)) -> dict[str, int]:
    total = sum(counter.values())
    result, seen, wanted = {}, 0, list(points)
    for length in sorted(counter):
        seen += counter[length]
        while wanted and seen >= total * wanted[0] / 100:
            result[f"p{wanted.pop(0)}"] = length
    result["max"] = max(counter)
    return result


class QualityFilter:
    def __init__(self, config: DataConfig, base_dir: Path, tokenizer: Any = None):
        self.config = config
        self.seen: dict[str, set[bytes]] = defaultdict(set)
        decontamination = config.decontamination
        self.decontaminator = None
        if decontamination is not None:
            files = [recipe_file(name, base_dir) for name in decontamination.question_files]
            self.decontaminator = Decontaminator(files, decontamination.ngram)
        self.lengths = TokenLengths(tokenizer) if tokenizer is not None else None

    def drop_reason(self, example: Example, prompt_key: str) -> str | None:
        """Why this example is dropped, or None to keep it (its lengths are then recorded).

        `prompt_key` is the example's normalized prompt (normalized_text of prompt_of)."""
        row = example.row
        if example.kind == "preference" and row["chosen"] == row["rejected"]:
            return "chosen_equals_rejected"
        if self.config.dedup != "none" and self.seen_before("exact", example, json.dumps(row, sort_keys=True)):
            return "duplicate"
        if self.config.dedup == "prompt" and self.seen_before("prompt", example, prompt_key):
            return "duplicate_prompt"
        if self.decontaminator is not None and self.decontaminator.overlap(user_text(example)) >= self.config.decontamination.threshold:
            return "contaminated"
        if self.lengths is not None:
            lengths = self.lengths.measure(example)
            if self.config.max_length is not None and lengths["total"] > self.config.max_length:
                return "too_long"
            self.lengths.record(lengths)
        return None

    def seen_before(self, check: str, example: Example, text: str) -> bool:
        seen = self.seen[f"{check}/{example.kind}"]
        key = digest(text)
        if key in seen:
            return True
        seen.add(key)
        return False
