"""OpenAssistant message trees (one message per row, trees contiguous) into preference pairs and SFT conversations.

Pairs: for every user message, its best-ranked assistant reply (lowest rank) against each lower-ranked sibling.
SFT: per tree, the conversation that follows the best-ranked reply at every step (and the earliest user follow-up).
Deleted messages, messages that failed review, and everything below them are left out, as in OASST's own exports.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any, Iterator

from finetune.config.data import SourceConfig
from data_prep.records import Example, Problem, Row

ROLES = {"prompter": "user", "assistant": "assistant"}
REQUIRED = ("message_id", "message_tree_id", "role", "text")


def oasst_examples(rows: Iterator[Row], source: SourceConfig, seed: int) -> Iterator[Example | Problem]:
    """options: {pairs: true, sft: true} choose what to emit."""
    finished: set[str] = set()
    for tree_id, tree_rows in groupby(rows, key=lambda row: row.data.get("message_tree_id") if row.data else None):
        messages = []
        for row in tree_rows:
            problem = message_problem(row, tree_id, finished)
            if problem is not None:
                yield problem
            else:
                messages.append((row.location, row.data))
        if messages:
            finished.add(tree_id)
            yield from tree_examples(messages, source.options)


def message_problem(row: Row, tree_id: Any, finished: set[str]) -> Problem | None:
    if row.error is not None:
        return Problem(row.location, row.error)
    missing = [field for field in REQUIRED if field not in row.data]
    if missing:
        return Problem(row.location, f"missing field '{missing[0]}'")
    if row.data["role"] not in ROLES:
        return Problem(row.location, f"role '{row.data['role']}'; OpenAssistant messages are prompter or assistant")
    if tree_id in finished:
        return Problem(row.location, f"tree {tree_id} continues after other trees; sort the file by message_tree_id")
    return None


def usable_messages(messages: list[tuple[str, dict]]) -> dict[str, tuple[str, dict]]:
    """Messages whose whole thread up to the root is present, not deleted and not rejected in review."""
    ok = {m["message_id"]: (loc, m) for loc, m in messages if not m.get("deleted") and m.get("review_result") is not False}
    usable = {}
    for message_id, item in ok.items():
        node = item[1]
        while node.get("parent_id") is not None and node["parent_id"] in ok:
            node = ok[node["parent_id"]][1]
        if node.get("parent_id") is None:
            usable[message_id] = item
    return usable


def tree_examples(messages: list[tuple[str, dict]], options: dict) -> Iterator[Example]:
    usable = usable_messages(messages)
    children: dict[str, list[dict]] = {}
    for _, message in usable.values():
        children.setdefault(message.get("parent_id"), []).append(message)
    if options.get("pairs", True):
        for _, message in usable.values():
            if message["role"] == "prompter":
                yield from sibling_pairs(thread(message, usable), children.get(message["message_id"], []), usable)
    if options.get("sft", True):
        yield from best_path(children, usable)


def thread(message: dict, usable: dict) -> list[dict[str, str]]:
    """Chat messages from the tree's root down to `message`."""
    path = [message]
    while path[-1].get("parent_id") is not None:
        path.append(usable[path[-1]["parent_id"]][1])
    return [{"role": ROLES[m["role"]], "content": m["text"]} for m in reversed(path)]


def ranked_replies(replies: list[dict]) -> list[dict]:
    return sorted((m for m in replies if m["role"] == "assistant" and m.get("rank") is not None), key=lambda m: m["rank"])


def sibling_pairs(prompt: list, replies: list[dict], usable: dict) -> Iterator[Example]:
    ranked = ranked_replies(replies)
    for worse in ranked[1:]:
        best = ranked[0]
        if worse["rank"] > best["rank"]:
            row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": best["text"]}],
                   "rejected": [{"role": "assistant", "content": worse["text"]}]}
            yield Example("preference", row, usable[best["message_id"]][0])


def best_reply(replies: list[dict]) -> dict | None:
    """The lowest-ranked assistant reply, or the only reply when there is one and it has no rank."""
    ranked = ranked_replies(replies)
    if ranked:
        return ranked[0]
    assistants = [m for m in replies if m["role"] == "assistant"]
    return assistants[0] if len(assistants) == 1 else None


def best_path(children: dict, usable: dict) -> Iterator[Example]:
    roots = [m for m in children.get(None, []) if m["role"] == "prompter"]
    for root in roots:
        path, node = [], root
        while node is not None:
            reply = best_reply(children.get(node["message_id"], []))
            if reply is None:
                break
            path += [node, reply]
            followups = sorted((m for m in children.get(reply["message_id"], []) if m["role"] == "prompter"),
                               key=lambda m: m.get("created_date") or "")
            node = followups[0] if followups else None
        if path:
            messages = [{"role": ROLES[m["role"]], "content": m["text"]} for m in path]
            yield Example("sft", {"messages": messages}, usable[path[-1]["message_id"]][0])
