"""Preference batches without padding: every sequence of a batch laid end to end in one row.

TRL pads each chosen and rejected sequence to the longest of the batch; on hh-rlhf 59% of that batch is padding,
and the prompt is computed twice per pair. Here the batch is one row of real tokens, in one of two layouts:

- padding-free: `prompt+chosen` and `prompt+rejected` of each pair, one after the other;
- prompt-shared (Wang et al. 2024, "Accelerating DPO with Prefix Sharing"): `prompt, chosen, rejected` once per
  pair; rejected sees the prompt but not chosen, and its positions continue from the prompt's end.

Each sequence (or pair) is an attention block, recorded as (start, prompt_end, split, end): queries in
[start, split) attend causally within it; queries in [split, end) attend to the prompt [start, prompt_end) and
causally to [split, end). A padding-free sequence is a block with prompt_end == split == end.

Every scored token (a completion token whose log-prob the loss needs) is recorded with the packed position of the
hidden state that predicts it and its place (row, column) in TRL's padded log-prob layout, so TRL's loss code reads
the packed results unchanged. The collator returns TRL's padded batch too: its masks feed TRL's loss and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

PACKED_KEYS = ("packed_input_ids", "packed_position_ids", "packed_blocks", "packed_router_weights",
               "packed_score_source", "packed_score_token", "packed_score_row", "packed_score_col")


@dataclass
class PackedLayout:
    """One packed row being built: tokens, positions, attention blocks and the tokens to score."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    blocks: list[tuple[int, int, int, int]] = field(default_factory=list)
    # A prompt shared by both sequences of a pair weighs 2 in the load-balancing loss, as in the padded batch.
    router_weights: list[float] = field(default_factory=list)
    scores: list[tuple[int, int, int, int]] = field(default_factory=list)  # (source, token, row, column)

    def add_sequence(self, ids: list[int], completion_mask: list[int], row: int) -> None:
        start = len(self.tokens)
        self.extend(ids, range(len(ids)), weight=1.0)
        self.blocks.append((start, start + len(ids), start + len(ids), start + len(ids)))
        for position in range(1, len(ids)):
            if completion_mask[position]:
                self.scores.append((start + position - 1, ids[position], row, position - 1))

    def add_pair(self, prompt: list[int], chosen: list[int], rejected: list[int], chosen_row: int,
                 rejected_row: int) -> None:
        start, p, c = len(self.tokens), len(prompt), len(chosen)
        self.extend(prompt, range(p), weight=2.0)
        self.extend(chosen, range(p, p + c), weight=1.0)
        self.extend(rejected, range(p, p + len(rejected)), weight=1.0)
        self.blocks.append((start, start + p, start + p + c, len(self.tokens)))
        for j, token in enumerate(chosen):
            if p + j >= 1:
                self.scores.append((start + p + j - 1, token, chosen_row, p + j - 1))
        for j, token in enumerate(rejected):
            if p + j >= 1:
                # The first rejected token is predicted from the prompt's last token, not from chosen's last.
                source = start + p - 1 if j == 0 else start + p + c + j - 1
                self.scores.append((source, token, rejected_row, p + j - 1))

    def extend(self, ids: list[int], positions, weight: float) -> None:
        self.tokens.extend(ids)
        self.positions.extend(positions)
        self.router_weights.extend([weight] * len(ids))

    def tensors(self) -> dict[str, torch.Tensor]:
        source, token, row, col = zip(*self.scores) if self.scores else ((),) * 4
        return {
            "packed_input_ids": torch.tensor([self.tokens]),
            "packed_position_ids": torch.tensor([self.positions]),
            "packed_blocks": torch.tensor(self.blocks, dtype=torch.long).reshape(-1, 4),
            "packed_router_weights": torch.tensor([self.router_weights]),
            "packed_score_source": torch.tensor(source, dtype=torch.long),
            "packed_score_token": torch.tensor(token, dtype=torch.long),
            "packed_score_row": torch.tensor(row, dtype=torch.long),
            "packed_score_col": torch.tensor(col, dtype=torch.long),
        }


def truncate(ids: list[int], max_length: int | None, mode: str) -> list[int]:
    """TRL's per-sequence truncation (DataCollatorForPreference)."""
    if max_length is None:
        return ids
    return ids[:max_length] if mode == "keep_start" else ids[-max_length:]


def pack_pairs(examples: list[dict[str, Any]], max_length: int | None, truncation_mode: str,
               share_prompt: bool) -> dict[str, torch.Tensor]:
    """The packed row of a batch of tokenized pairs; rows 0..n-1 of the padded layout are chosen, n..2n-1 rejected."""
    layout, n = PackedLayout(), len(examples)
    for i, example in enumerate(examples):
        prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
        if share_prompt:
            budget = None if max_length is None else max(max_length - len(prompt), 0)
            layout.add_pair(prompt, chosen[:budget], rejected[:budget], chosen_row=i, rejected_row=n + i)
            continue
        for row, completion in ((i, chosen), (n + i, rejected)):
            ids = truncate(prompt + completion, max_length, truncation_mode)
            mask = truncate([0] * len(prompt) + [1] * len(completion), max_length, truncation_mode)
            layout.add_sequence(ids, mask, row)
    return layout.tensors()


@dataclass
class PackedPreferenceCollator:
    """TRL's padded preference batch plus the packed row of the same pairs (see the module docstring)."""

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    share_prompt: bool = True

    def __post_init__(self):
        if self.share_prompt and self.truncation_mode != "keep_start":
            raise ValueError("speed.share_prompt needs dpo.truncation_mode: keep_start (with keep_end chosen and "
                             "rejected keep different prompt tokens). Set speed.share_prompt: false or keep_start.")
        self.padded = DataCollatorForPreference(pad_token_id=self.pad_token_id, max_length=self.max_length,
                                                truncation_mode=self.truncation_mode)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.padded(examples)
        batch.update(pack_pairs(examples, self.max_length, self.truncation_mode, self.share_prompt))
        return batch
