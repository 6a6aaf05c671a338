"""Checking converted rows against the normalized schema, and returning them with only the keys trainers read.

SFT: {"messages": [...]}, ending with an assistant turn. Preference: {"prompt": [...] ending with a user turn,
"chosen": [...], "rejected": [...]} each starting with an assistant turn. Roles alternate user/assistant after an
optional leading system message; every content is non-empty text.
"""

from __future__ import annotations

from typing import Any

from data_prep.records import RowError

ROLES = ("system", "user", "assistant")


def normalized(kind: str, row: dict[str, Any]) -> dict[str, Any]:
    if kind == "sft":
        messages = clean_messages(row.get("messages"), "messages")
        check_turn_order(messages, "messages", first="user")
        if messages[-1]["role"] != "assistant":
            raise RowError("'messages' must end with an assistant turn (the text the model learns)")
        return {"messages": messages}
    if kind == "preference":
        return normalized_pair(row)
    return row


def normalized_pair(row: dict[str, Any]) -> dict[str, Any]:
    prompt = clean_messages(row.get("prompt"), "prompt")
    check_turn_order(prompt, "prompt", first="user")
    if prompt[-1]["role"] != "user":
        raise RowError("'prompt' must end with a user turn")
    pair = {"prompt": prompt}
    for field in ("chosen", "rejected"):
        messages = clean_messages(row.get(field), field)
        check_turn_order(messages, field, first="assistant")
        pair[field] = messages
    return pair


def clean_messages(value: Any, field: str) -> list[dict[str, str]]:
    if value is None:
        raise RowError(f"missing field '{field}'")
    if not isinstance(value, list) or not value:
        raise RowError(f"'{field}' must be a non-empty list of messages")
    messages = []
    for number, message in enumerate(value, start=1):
        where = f"'{field}' message {number}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError(f"{where} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise RowError(f"{where} has role '{role}'; use one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"{where} ({role}) has empty text")
        messages.append({"role": role, "content": content})
    return messages


def check_turn_order(messages: list[dict[str, str]], field: str, first: str) -> None:
    """A system message may only lead; after it, turns alternate starting with `first`."""
    turns = messages[1:] if messages[0]["role"] == "system" and first == "user" else messages
    expected = first
    for number, message in enumerate(turns, start=len(messages) - len(turns) + 1):
        if message["role"] != expected:
            raise RowError(f"'{field}' message {number} is {message['role']} where {expected} was expected "
                           f"(turns must alternate user/assistant)")
        expected = "assistant" if expected == "user" else "user"
