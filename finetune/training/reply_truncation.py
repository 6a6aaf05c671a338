"""Conversations that SFT's truncation leaves without an assistant token.

SFT truncates each tokenized conversation to `sft.max_length` from its start, then TRL drops the examples whose
assistant-only loss mask became empty. A chat template with a long system text (gpt-oss renders ~100 tokens
before the first message) can fill `max_length` on its own: every example is dropped and torch stops with
"num_samples should be a positive integer value, but got num_samples=0". Here the length the template needs before
each conversation's first reply is measured, to say so in plain words (SFT) and to warn early (prep).
"""

from __future__ import annotations

import dataclasses
import statistics

from finetune.config.parsing import trainer_config_class

PREP_SAMPLE = 200  # conversations prep measures: enough to see "most", cheap for any tokenizer


def sft_cut(sft_fields: dict) -> int | None:
    """The length SFT keeps of each conversation from its start (`sft_fields`: the recipe's sft: section); None
    when it keeps the replies some other way (packing chunks whole conversations, keep_end keeps the last tokens)
    or does not truncate."""
    defaults = {f.name: f.default for f in dataclasses.fields(trainer_config_class("sft"))}
    settings = {**defaults, **sft_fields}
    if settings["packing"] or settings["truncation_mode"] != "keep_start":
        return None
    return settings["max_length"]


def reply_starts(tokenizer, conversations) -> list[int]:
    """Per conversation: how many tokens the chat template renders before the first assistant reply's text."""
    starts = []
    for messages in conversations:
        first = next((i for i, message in enumerate(messages) if message["role"] == "assistant"), None)
        if first is not None:
            prompt = tokenizer.apply_chat_template(messages[:first], add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)
            starts.append(len(prompt["input_ids"]))
    return starts


def lost_share(starts: list[int], max_length: int) -> float:
    """The share of conversations whose first reply starts at or after the cut: all their assistant tokens lost."""
    return sum(start >= max_length for start in starts) / len(starts) if starts else 0.0


def describe_starts(starts: list[int]) -> str:
    return (f"the chat template renders {min(starts)} to {max(starts)} tokens (median "
            f"{int(statistics.median(starts))}) before a conversation's first assistant reply")


def no_replies_left_message(max_length: int, starts: list[int]) -> str:
    """Why SFT has nothing to train on, and the key to change."""
    return (f"[sft] sft.max_length={max_length} cuts every training conversation before its first assistant token: "
            f"{describe_starts(starts)}, so TRL dropped every example as fully masked (no assistant token left "
            f"to learn from). Set sft.max_length above {max(starts)} (the template's text before the first reply), "
            f"or shorten the system text of the chat template.")


def prep_warning(sft_fields: dict, tokenizer, conversations) -> str | None:
    """One line when most of the prepared conversations would lose all their assistant tokens to SFT's cut."""
    max_length = sft_cut(sft_fields)
    starts = reply_starts(tokenizer, conversations[:PREP_SAMPLE]) if max_length else []
    share = lost_share(starts, max_length) if starts else 0.0
    if share <= 0.5:
        return None
    return (f"[data] warning: sft.max_length={max_length} would cut {share:.0%} of the SFT conversations before "
            f"their first assistant token ({describe_starts(starts)}); SFT drops those. Raise sft.max_length "
            f"above {max(starts)}.")
