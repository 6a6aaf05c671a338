"""On-policy preference pairs: sample K completions per prompt from a model, score each with a judge, keep best vs worst.

options: {model: PATH or hub id (required), k: 4, judge: programmatic | PATH of a reward model, max_new_tokens: 64,
temperature: 1.0, min_margin: 0, synthetic: N}. Prompts come from the source's rows (`prompt` as text or messages,
or MT-Bench `turns`), or, with no path or dataset, from the prompts of N synthetic preference pairs.
A judge is any `Callable[[prompt_messages, completion_text], float]`; higher is better.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from finetune.core import families, synthetic_task
from finetune.config.data import SourceConfig
from data_prep.records import Example, Problem, Row, RowError

Judge = Callable[[list[dict], str], float]
Prompt = tuple[str, list[dict]]  # (location, messages ending with a user turn)


def on_policy_pairs(rows: Iterator[Row], source: SourceConfig, seed: int) -> Iterator[Example | Problem]:
    options = source.options
    judge = make_judge(str(options.get("judge", "programmatic")))
    sampler = None  # loaded at the first prompt: a source with no usable prompts never loads the model
    for item in prompts(rows, source, seed):
        if isinstance(item, Problem):
            yield item
            continue
        location, prompt = item
        sampler = sampler or Sampler(options, seed)
        try:
            result = best_vs_worst(location, prompt, sampler.sample(prompt), judge, float(options.get("min_margin", 0.0)))
        except RowError as error:  # e.g. the programmatic judge given a question it cannot check
            result = Problem(location, str(error))
        yield result


def prompts(rows: Iterator[Row], source: SourceConfig, seed: int) -> Iterator[Prompt | Problem]:
    if source.path is None and source.dataset is None:
        for index, pair in enumerate(synthetic_task.preference_pairs(int(source.options.get("synthetic", 0)), seed)):
            yield f"synthetic prompt #{index}", pair["prompt"]
        return
    for row in rows:
        if row.error is not None:
            yield Problem(row.location, row.error)
        elif isinstance(row.data.get("prompt"), (str, list)):
            prompt = row.data["prompt"]
            yield row.location, [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        elif isinstance(row.data.get("turns"), list) and row.data["turns"]:
            yield row.location, [{"role": "user", "content": row.data["turns"][0]}]
        else:
            yield Problem(row.location, "missing field 'prompt' (text or messages) or 'turns' (MT-Bench question)")


def best_vs_worst(location: str, prompt: list[dict], completions: list[str], judge: Judge, min_margin: float) -> Example | Problem:
    """The highest-scored completion against the lowest; equal scores or a small margin drop the prompt."""
    scored = sorted(((judge(prompt, text), text) for text in completions), key=lambda item: -item[0])
    (best_score, best), (worst_score, worst) = scored[0], scored[-1]
    if best_score == worst_score:
        return Problem(location, "tie", malformed=False)
    if best_score - worst_score < min_margin:
        return Problem(location, "small_margin", malformed=False)
    return Example("preference", {"prompt": prompt, "chosen": [{"role": "assistant", "content": best}],
                                  "rejected": [{"role": "assistant", "content": worst}]}, location)


class Sampler:
    def __init__(self, options: dict, seed: int):
        self.tokenizer = AutoTokenizer.from_pretrained(options["model"])
        self.model = AutoModelForCausalLM.from_pretrained(options["model"]).eval()
        families.prepare_for_generation(self.model)
        self.k = int(options.get("k", 4))
        self.settings = {"max_new_tokens": int(options.get("max_new_tokens", 64)),
                         "temperature": float(options.get("temperature", 1.0))}
        self.generator_seed = seed

    def sample(self, prompt: list[dict]) -> list[str]:
        inputs = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        torch.manual_seed(self.generator_seed)  # per prompt, so one prompt's samples do not depend on the others
        with torch.no_grad():
            output = self.model.generate(**inputs, do_sample=True, num_return_sequences=self.k,
                                         pad_token_id=self.tokenizer.pad_token_id, **self.settings)
        return self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def make_judge(name: str) -> Judge:
    return programmatic_judge if name == "programmatic" else reward_model_judge(name)


def programmatic_judge(prompt: list[dict], completion: str) -> float:
    """The synthetic task's judge (synthetic_task.score_answer, 1-10), against the answer its question asks for."""
    found = synthetic_task.reference_for([m["content"] for m in prompt if m["role"] == "user"])
    if found is None:
        raise RowError("the programmatic judge only scores synthetic-task questions; use judge: PATH of a reward model")
    category, reference = found
    return float(synthetic_task.score_answer(category, completion, reference))


def reward_model_judge(path: str) -> Judge:
    """A sequence-classification reward model: the score is its first logit for the templated conversation."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    def judge(prompt: list[dict], completion: str) -> float:
        text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)
        with torch.no_grad():
            return float(model(**tokenizer(text, return_tensors="pt")).logits[0, 0])

    return judge
