"""Assistant-only loss for chat templates without `{% generation %}` markers: the assistant's tokens found by
rendering the conversation turn by turn.

Base models ship plain templates (or none, and the recipe gives one). TRL's assistant-only loss reads the markers;
without them moetune finds the same tokens itself: for each assistant message i, the tokens of
`messages[:i]` with the generation prompt are a prefix of the tokens of `messages[:i+1]`, which are a prefix of the
whole conversation's tokens; the assistant's tokens are those between the two prefixes (its reply and its
end-of-turn text, what generation produces after the prompt). A template that renders earlier turns differently
once later ones follow (e.g. dropping past reasoning) breaks the prefix property: such a conversation is refused
with the reason, never masked by a guess.
"""

from __future__ import annotations

from datasets import Dataset
from trl.data_utils import common_prefix_length

class NotPrefixStable(ValueError):
    """The template renders an assistant turn differently once later turns follow (e.g. drops its reasoning)."""


def token_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    if not messages:
        return []
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                             return_dict=True)
    return list(rendered["input_ids"])


def turn_span(tokenizer, messages, i: int, whole: list[int]) -> tuple[int, int]:
    """[start, end) of assistant message i in the whole conversation's tokens.

    start: where the tokens of `messages[:i]` with the generation prompt part from the whole conversation (the
    prompt cue ends; a template whose generation prompt opens an empty thought block the history renders closed
    parts inside it, as TRL's prompt-completion SFT does). end: where `messages[:i+1]` alone parts from it (a
    template that ends every rendering with an end-of-text token has it only once, at the very end)."""
    start = common_prefix_length(token_ids(tokenizer, messages[:i], True), whole)
    end = common_prefix_length(token_ids(tokenizer, messages[: i + 1]), whole)
    reply = str(messages[i].get("content") or "").strip()
    if reply and reply not in tokenizer.decode(whole[start:end]):
        raise NotPrefixStable(
            f"the chat template renders assistant turn {i} differently once later turns follow, so the tokens "
            f"between its prompt and its end are {tokenizer.decode(whole[start:end])!r}, not its reply")
    return start, end


def assistant_mask(tokenizer, messages) -> tuple[list[int], list[int]]:
    """(input_ids, assistant_masks) of a conversation: 1 on the tokens each assistant turn adds after its prompt."""
    whole = token_ids(tokenizer, messages)
    mask = [0] * len(whole)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = turn_span(tokenizer, messages, i, whole)
            mask[start:end] = [1] * (end - start)
    return whole, mask


def tokenized_with_masks(tokenizer, conversations: Dataset) -> Dataset:
    """The conversations as TRL's pre-tokenized SFT rows: `input_ids` and `assistant_masks` (TRL's labels read it)."""
    def tokenize(example):
        input_ids, masks = assistant_mask(tokenizer, example["messages"])
        return {"input_ids": input_ids, "assistant_masks": masks}

    return conversations.map(tokenize, remove_columns=conversations.column_names,
                             desc="Finding assistant tokens turn by turn")
