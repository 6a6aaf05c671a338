"""MT-Bench grading with FastChat's real question.jsonl, judge_prompts.jsonl and reference answers."""

from __future__ import annotations

import pytest

from eval.judge_prompts import load_judge_prompts, pair_prompt, parse_rating, parse_verdict, single_prompt, usable_reference
from eval.judging import judged_turns
from eval.questions import load_questions, load_reference_answers, reference_turns
from helpers.shared_data import mt_bench_file

REFERENCE_CATEGORIES = ["math", "reasoning", "coding"]
ANSWER = ["FIRST ANSWER", "SECOND ANSWER"]
OTHER = ["OTHER FIRST", "OTHER SECOND"]
SINGLE_INSTRUCTION = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by providing a "
    "short explanation. Be as objective as possible. After providing your explanation, you must rate the response on a "
    "scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
)


def reference_block(q1: str, q2: str, r1: str, r2: str) -> str:
    return (f"<|The Start of Reference Answer|>\n\n### User:\n{q1}\n\n### Reference answer:\n{r1}\n\n### User:\n{q2}\n\n"
            f"### Reference answer:\n{r2}\n\n<|The End of Reference Answer|>")


def conversation(assistant: str, q1: str, q2: str, a1: str, a2: str) -> str:
    return (f"<|The Start of Assistant {assistant}'s Conversation with User|>\n\n### User:\n{q1}\n\n"
            f"### Assistant {assistant}:\n{a1}\n\n### User:\n{q2}\n\n### Assistant {assistant}:\n{a2}\n\n"
            f"<|The End of Assistant {assistant}'s Conversation with User|>")


@pytest.fixture(scope="module")
def mt_bench():
    questions = {q["question_id"]: q for q in load_questions(mt_bench_file("question.jsonl"))}
    prompts = load_judge_prompts(mt_bench_file("judge_prompts.jsonl"))
    references = load_reference_answers(mt_bench_file("reference_answer/gpt-4.jsonl"))
    return questions, prompts, references


def single(mt_bench, question_id: int, turn: int):
    questions, prompts, references = mt_bench
    question = questions[question_id]
    reference = usable_reference(question, reference_turns(question, references), turn, REFERENCE_CATEGORIES)
    return question, references, single_prompt(prompts, question, ANSWER, turn, reference)


def test_fastchat_questions_load_unchanged(mt_bench):
    questions, prompts, references = mt_bench
    assert len(questions) == 80 and len(prompts) == 8 and sorted(references) == list(range(101, 131))
    assert all(judged_turns(q) == [1, 2] for q in questions.values())


def test_general_question_turn_1_exact_prompt(mt_bench):
    question, _, prompt = single(mt_bench, 81, 1)
    assert prompt.template == "single-v1"
    assert prompt.system == "You are a helpful assistant."
    assert prompt.user == (SINGLE_INSTRUCTION + "[Question]\n" + question["turns"][0] + "\n\n"
                           "[The Start of Assistant's Answer]\nFIRST ANSWER\n[The End of Assistant's Answer]")


def test_general_question_turn_2_exact_prompt(mt_bench):
    question, _, prompt = single(mt_bench, 81, 2)
    q1, q2 = question["turns"]
    assert prompt.template == "single-v1-multi-turn"
    assert prompt.system.startswith("Please act as an impartial judge") and prompt.system.endswith("\"Rating: [[5]]\".\n\n")
    assert prompt.user == conversation("A", q1, q2, *ANSWER)


def test_math_question_turn_1_uses_reference_file_answer(mt_bench):
    question, references, prompt = single(mt_bench, 111, 1)
    assert prompt.template == "single-math-v1"
    reference = references[111][0]
    assert reference != question["reference"][0]  # the reference file wins over the question's own hint
    assert prompt.user.startswith("[Instruction]\nPlease act as an impartial judge")
    assert prompt.user.endswith(
        f"[Question]\n{question['turns'][0]}\n\n[The Start of Reference Answer]\n{reference}\n"
        "[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\nFIRST ANSWER\n[The End of Assistant's Answer]"
    )


def test_reasoning_question_turn_2_exact_reference_guided_prompt(mt_bench):
    question, references, prompt = single(mt_bench, 101, 2)
    (q1, q2), (r1, r2) = question["turns"], references[101]
    assert prompt.template == "single-math-v1-multi-turn"
    assert prompt.user == reference_block(q1, q2, r1, r2) + "\n\n\n" + conversation("A", q1, q2, *ANSWER)


def test_reference_outside_reference_categories_is_not_used(mt_bench):
    question, _, prompt = single(mt_bench, 131, 1)
    assert question["reference"] and prompt.template == "single-v1"
    assert "Reference" not in prompt.user


def test_pairwise_general_turn_1_exact_prompt(mt_bench):
    questions, prompts, _ = mt_bench
    prompt = pair_prompt(prompts, questions[81], ANSWER, OTHER, 1, None)
    assert prompt.template == "pair-v2" and prompt.system.endswith('"[[C]]" for a tie.')
    assert prompt.user == (
        f"[User Question]\n{questions[81]['turns'][0]}\n\n[The Start of Assistant A's Answer]\nFIRST ANSWER\n"
        "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\nOTHER FIRST\n[The End of Assistant B's Answer]"
    )


def test_pairwise_coding_turn_2_exact_reference_guided_prompt(mt_bench):
    questions, prompts, references = mt_bench
    question = questions[121]
    reference = usable_reference(question, reference_turns(question, references), 2, REFERENCE_CATEGORIES)
    prompt = pair_prompt(prompts, question, ANSWER, OTHER, 2, reference)
    (q1, q2), (r1, r2) = question["turns"], references[121]
    assert prompt.template == "pair-math-v1-multi-turn"
    assert prompt.user == "\n\n\n".join([reference_block(q1, q2, r1, r2), conversation("A", q1, q2, *ANSWER),
                                         conversation("B", q1, q2, *OTHER)])


def test_missing_prompt_names_what_the_file_has(mt_bench):
    questions, prompts, _ = mt_bench
    with pytest.raises(KeyError, match="no prompt named 'single-v1'"):
        single_prompt({"pair-v2": prompts["pair-v2"]}, questions[81], ANSWER, 1, None)


@pytest.mark.parametrize("judgment, rating", [
    ("Good answer. Rating: [[7]]", 7),
    ("Rating: [[8.5]] and later [[2]]", 8.5),
    ("Rating: [6]", 6),  # FastChat's fallback pattern
    ("I would say 9 out of 10.", -1),
    ("Rating: [[seven]]", -1),
])
def test_parse_rating(judgment, rating):
    assert parse_rating(judgment) == rating


@pytest.mark.parametrize("judgment, verdict", [
    ("[[A]]", "A"), ("so [[B]]", "B"), ("[[C]]", "tie"), ("A is better", "error"),
])
def test_parse_verdict(judgment, verdict):
    assert parse_verdict(judgment) == verdict
