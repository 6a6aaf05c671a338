"""Models answer the questions: batched generation with each model's chat template, turn by turn.

The second turn is asked after the model's own first answer, as in MT-Bench. Questions are answered in batches of
one sampling temperature (MT-Bench's per category), and every finished batch is appended to the model's answer
file in FastChat's model-answer format, so a re-run only answers what is missing.
"""

from __future__ import annotations

import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from eval.jsonl import append_jsonl, read_jsonl
from finetune.core import families

Message = dict[str, str]


def prepare_for_generation(model: Any, tokenizer: Any) -> None:
    model.eval()
    families.prepare_for_generation(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def generate_replies(
    model: Any, tokenizer: Any, conversations: list[list[Message]], max_new_tokens: int, temperature: float
) -> list[str]:
    """One assistant reply per conversation, all generated in one batch (left padding so replies line up)."""
    texts = [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) for messages in conversations]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    inputs = inputs.to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [reply.strip() for reply in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def answer_batch(
    model: Any, tokenizer: Any, questions: list[dict[str, Any]], max_new_tokens: int, temperature: float
) -> list[list[str]]:
    """Every question's answers, turn by turn; questions with fewer turns drop out of later turns."""
    conversations: list[list[Message]] = [[] for _ in questions]
    for turn in range(max(len(question["turns"]) for question in questions)):
        active = [i for i, question in enumerate(questions) if turn < len(question["turns"])]
        for i in active:
            conversations[i].append({"role": "user", "content": questions[i]["turns"][turn]})
        replies = generate_replies(model, tokenizer, [conversations[i] for i in active], max_new_tokens, temperature)
        for i, reply in zip(active, replies):
            conversations[i].append({"role": "assistant", "content": reply})
    return [[m["content"] for m in messages if m["role"] == "assistant"] for messages in conversations]


def batches_by_temperature(
    questions: list[dict[str, Any]], temperatures: dict[str, float], batch_size: int
) -> Iterator[tuple[float, list[dict[str, Any]]]]:
    groups: dict[float, list[dict[str, Any]]] = {}
    for question in questions:
        groups.setdefault(temperatures.get(question["category"], 0.0), []).append(question)
    for temperature, group in groups.items():
        for start in range(0, len(group), batch_size):
            yield temperature, group[start:start + batch_size]


def answer_record(model_id: str, question: dict[str, Any], turns: list[str]) -> dict[str, Any]:
    """One answer in FastChat's model-answer format."""
    return {
        "question_id": question["question_id"],
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "choices": [{"index": 0, "turns": turns}],
        "tstamp": time.time(),
    }


def answer_questions(
    model: Any,
    tokenizer: Any,
    model_id: str,
    questions: list[dict[str, Any]],
    answer_file: Path,
    *,
    temperatures: dict[str, float],
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> None:
    """Answer the questions and append each finished batch to `answer_file`."""
    prepare_for_generation(model, tokenizer)
    with tqdm(total=len(questions), desc=f"[eval] {model_id} answering", unit="question", dynamic_ncols=True) as bar:
        for temperature, batch in batches_by_temperature(questions, temperatures, batch_size):
            # Seeded per batch from its first question, not from how many batches ran before (a resumed run skips some).
            torch.manual_seed(zlib.crc32(f"{seed}/{model_id}/{batch[0]['question_id']}".encode()))
            answers = answer_batch(model, tokenizer, batch, max_new_tokens, temperature)
            append_jsonl(answer_file, [answer_record(model_id, q, turns) for q, turns in zip(batch, answers)])
            bar.update(len(batch))


def unanswered(questions: list[dict[str, Any]], answer_file: Path) -> list[dict[str, Any]]:
    done = {record["question_id"] for record in read_jsonl(answer_file)}
    return [question for question in questions if question["question_id"] not in done]
