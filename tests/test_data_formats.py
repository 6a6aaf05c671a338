"""Converters on the real files in ../shared/data, checked against hand-checked rows, plus the small formats."""

import json
import random
from pathlib import Path

import pytest

from finetune.config.data import SourceConfig
from data_prep.formats import CONVERTERS, convert_preference, convert_scored, parse_transcript, render_transcript
from data_prep.records import Dropped, Example, Problem, Row, RowError
from data_prep.validate import normalized
from helpers.shared_data import require_shared_data


def convert_file(fmt: str, path: Path, limit: int | None = None, **options) -> list:
    source = SourceConfig(format=fmt, path=str(path), options=options)
    rows = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and number > limit:
                break
            rows.append(Row(f"{path}:{number}", json.loads(line)))
    return list(CONVERTERS[fmt](iter(rows), source, 0))


def test_hh_rlhf_prompt_plus_chosen_reproduces_the_transcript():
    path = require_shared_data("hh_rlhf/helpful_base_test.jsonl")
    originals = [json.loads(line) for line in path.read_text().splitlines()[:300]]
    examples = convert_file("hh_rlhf", path, limit=300)
    assert len(examples) == 300
    for original, example in zip(originals, examples):
        pair = example.row
        assert render_transcript(pair["prompt"] + pair["chosen"]) == original["prompt"] + original["chosen"]
        assert render_transcript(pair["prompt"] + pair["rejected"]) == original["prompt"] + original["rejected"]


def test_hh_rlhf_hand_checked_multi_turn_row():
    path = require_shared_data("hh_rlhf/helpful_base_test.jsonl")
    pair = normalized("preference", convert_file("hh_rlhf", path, limit=2)[1].row)
    assert [m["role"] for m in pair["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert pair["prompt"][0]["content"] == "How can I find out what types of butterflies are in my area?"
    assert pair["prompt"][1]["content"] == "Which location are you in?"
    assert pair["prompt"][2]["content"] == "I am in Oregon."
    assert pair["prompt"][4]["content"] == "Great. What are some common species then?"
    assert [m["role"] for m in pair["chosen"]] == ["assistant"]
    assert pair["chosen"][0]["content"].startswith("About 150 species of butterflies live in Oregon")


def test_hh_rlhf_full_transcripts_split_at_the_shared_prompt():
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    (example,) = CONVERTERS["hh_rlhf"](iter([Row("x:1", row)]), SourceConfig(format="hh_rlhf"), 0)
    assert example.row == {"prompt": [{"role": "user", "content": "Hi"}],
                    "chosen": [{"role": "assistant", "content": "Hello!"}],
                    "rejected": [{"role": "assistant", "content": "Go away."}]}


def test_transcript_without_human_turn_is_rejected():
    with pytest.raises(RowError, match="must start with"):
        parse_transcript("Assistant: hi")


def test_oasst_pairs_rank_the_better_reply_as_chosen():
    messages_path = require_shared_data("oasst1/oasst1_en_validation_messages.jsonl")
    messages = [json.loads(line) for line in messages_path.read_text().splitlines()]
    texts = [m["text"] for m in messages]
    by_text = {m["text"]: m for m in messages if texts.count(m["text"]) == 1}  # a few short replies repeat
    examples = convert_file("oasst", messages_path)
    pairs = [e.row for e in examples if e.kind == "preference"]
    assert pairs
    checked = [p for p in pairs if p["chosen"][0]["content"] in by_text and p["rejected"][0]["content"] in by_text]
    assert len(checked) > 0.9 * len(pairs)
    for pair in checked:
        chosen, rejected = by_text[pair["chosen"][0]["content"]], by_text[pair["rejected"][0]["content"]]
        assert chosen["parent_id"] == rejected["parent_id"]
        assert chosen["rank"] < rejected["rank"]
        assert pair["prompt"][-1]["content"] == next(m["text"] for m in messages if m["message_id"] == chosen["parent_id"])
    # The shared pairs file was built by the same rule (rank 0 vs each other ranked reply, reviewed threads only).
    reference = {(r["chosen"], r["rejected"]) for r in map(json.loads, require_shared_data("oasst1/oasst1_en_validation_pairs.jsonl").read_text().splitlines())}
    ours = {(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs}
    assert reference <= ours


def test_oasst_sft_follows_the_best_ranked_path():
    path = require_shared_data("oasst1/oasst1_en_validation_messages.jsonl")
    conversations = [e.row["messages"] for e in convert_file("oasst", path) if e.kind == "sft"]
    assert len(conversations) > 100
    for conversation in conversations:
        normalized("sft", {"messages": conversation})
    first = conversations[0]
    assert first[0]["content"] == "What do you think about ChatGPT?"
    assert first[1]["content"].startswith("As an open source alternative to ChatGPT")


def test_oasst_tree_split_across_the_file_is_reported():
    tree_a = {"message_id": "a", "parent_id": None, "message_tree_id": "A", "role": "prompter", "text": "hi"}
    tree_b = {"message_id": "b", "parent_id": None, "message_tree_id": "B", "role": "prompter", "text": "yo"}
    rows = [Row("f:1", tree_a), Row("f:2", tree_b), Row("f:3", dict(tree_a, message_id="a2", parent_id="a", role="assistant"))]
    problems = [i for i in CONVERTERS["oasst"](iter(rows), SourceConfig(format="oasst"), 0) if isinstance(i, Problem)]
    assert [(p.location, "sort the file" in p.reason) for p in problems] == [("f:3", True)]


def test_preference_formats():
    plain = convert_preference({"prompt": "Q?", "chosen": "yes", "rejected": "no"}, {}, random.Random(0))
    assert plain == [("preference", {"prompt": [{"role": "user", "content": "Q?"}],
                                     "chosen": [{"role": "assistant", "content": "yes"}],
                                     "rejected": [{"role": "assistant", "content": "no"}]})]
    user, a1, a2 = {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}
    follow = {"role": "user", "content": "more"}
    implicit = convert_preference({"chosen": [user, a1, follow, a1], "rejected": [user, a1, follow, a2]}, {}, random.Random(0))
    assert implicit[0][1] == {"prompt": [user, a1, follow], "chosen": [a1], "rejected": [a2]}
    with pytest.raises(RowError, match="missing field 'prompt'"):
        convert_preference({"chosen": "yes", "rejected": "no"}, {}, random.Random(0))


def completions(*scores):
    return [{"text": f"answer {score}", "score": score} for score in scores]


def test_scored_best_vs_worst_and_random_lower():
    row = {"prompt": "Q?", "completions": completions(3, 9, 1, 5)}
    (_, pair), = convert_scored(row, {}, random.Random(0))
    assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == ("answer 9", "answer 1")
    rejected = {convert_scored(row, {"pairing": "best_vs_random"}, random.Random(seed))[0][1]["rejected"][0]["content"]
                for seed in range(30)}
    assert rejected == {"answer 3", "answer 1", "answer 5"}


def test_scored_ties_and_small_margins_are_dropped():
    with pytest.raises(Dropped, match="tie"):
        convert_scored({"prompt": "Q?", "completions": completions(4, 4)}, {}, random.Random(0))
    with pytest.raises(Dropped, match="small_margin"):
        convert_scored({"prompt": "Q?", "completions": completions(4, 5)}, {"min_margin": 2}, random.Random(0))
    with pytest.raises(RowError, match="numeric 'score'"):
        convert_scored({"prompt": "Q?", "completions": [{"text": "a"}, {"text": "b"}]}, {}, random.Random(0))


def test_sft_rows_pass_through():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    items = list(CONVERTERS["sft"](iter([Row("f:1", {"messages": messages})]), SourceConfig(format="sft"), 0))
    assert items == [Example("sft", {"messages": messages}, "f:1")]
