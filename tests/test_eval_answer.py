"""Answer generation with a tiny random MoE: batching, turn order, temperatures, seeding, the answer format."""

from __future__ import annotations

import pytest

from eval.answer import answer_batch, answer_questions, batches_by_temperature, generate_replies, prepare_for_generation
from finetune.config.evaluation import MT_BENCH_TEMPERATURES
from eval.jsonl import read_jsonl
from helpers.tiny import tiny_chat_model

QUESTIONS = [
    {"question_id": 1, "category": "math", "turns": ["What is 1+1?", "And 2+2?"]},
    {"question_id": 2, "category": "sorting", "turns": ["Sort: 3 1 2"]},
    {"question_id": 3, "category": "reasoning", "turns": ["Why is the sky blue? Explain at length.", "Shorter."]},
]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model, tokenizer = tiny_chat_model(seed=3)  # a seed whose replies are not all special tokens
    prepare_for_generation(model, tokenizer)  # also turns off router logits, which break generate()
    return model, tokenizer


def test_batched_greedy_replies_match_one_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    conversations = [[{"role": "user", "content": q["turns"][0]}] for q in QUESTIONS]  # different lengths: padding
    batched = generate_replies(model, tokenizer, conversations, 8, 0.0)
    alone = [generate_replies(model, tokenizer, [c], 8, 0.0)[0] for c in conversations]
    assert batched == alone and all(batched)


def test_second_turn_follows_the_models_own_first_answer(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    answers = answer_batch(model, tokenizer, QUESTIONS, 8, 0.0)
    assert [len(a) for a in answers] == [2, 1, 2]  # the single-turn question drops out of turn 2
    first, second = answers[0]
    conversation = [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "And 2+2?"}]
    assert generate_replies(model, tokenizer, [conversation], 8, 0.0) == [second]


def test_batches_group_questions_by_mt_bench_temperature():
    questions = [{"question_id": i, "category": c, "turns": ["x"]}
                 for i, c in enumerate(["writing", "math", "stem", "sorting", "roleplay", "humanities", "coding"])]
    batches = [(t, [q["category"] for q in batch]) for t, batch in batches_by_temperature(questions, MT_BENCH_TEMPERATURES, 2)]
    assert batches == [(0.7, ["writing", "roleplay"]), (0.0, ["math", "sorting"]), (0.0, ["coding"]),
                       (0.1, ["stem", "humanities"])]


def test_sampled_answers_are_seeded_and_saved_in_fastchat_format(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    writing = [{"question_id": f"w{i}", "category": "writing", "turns": ["Write a story.", "Again."]} for i in range(2)]

    def answers(seed: int, name: str) -> list[list[str]]:
        path = tmp_path / f"{name}.jsonl"
        answer_questions(model, tokenizer, "tiny", writing, path, temperatures=MT_BENCH_TEMPERATURES,
                         max_new_tokens=4, batch_size=2, seed=seed)
        records = read_jsonl(path)
        assert [r["question_id"] for r in records] == ["w0", "w1"]
        assert all(r["model_id"] == "tiny" and r["choices"][0]["index"] == 0 for r in records)
        return [r["choices"][0]["turns"] for r in records]

    first = answers(0, "first")
    assert answers(0, "again") == first
    assert answers(1, "other_seed") != first
