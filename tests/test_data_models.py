"""Prep features that need a tokenizer or a model, with a character tokenizer and a tiny random Mixtral built here."""

import json
import string

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import MixtralConfig, MixtralForCausalLM, MixtralForSequenceClassification, PreTrainedTokenizerFast

from data_prep.onpolicy import best_vs_worst, programmatic_judge, reward_model_judge
from finetune.stages.prepare import run
from finetune.core.synthetic_task import preference_pairs
from finetune.config.parsing import parse_recipe

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, plus <pad> and <eos>: lengths are easy to count by hand."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_recipe(tmp_path, sources, **data):
    # data.max_length counts a named model's tokens (run() is given that tokenizer here); model.init has none yet.
    model = {"name_or_path": "org/char-model"} if "max_length" in data else {"init": {}}
    raw = {"run_dir": str(tmp_path / "run"), "model": model, "data": {"sources": sources, **data}}
    return parse_recipe(raw, str(tmp_path / "recipe.yaml"))


def test_over_length_rows_are_dropped_and_lengths_reported(tmp_path):
    rows = [{"prompt": "Q?", "chosen": "short", "rejected": "no"},
            {"prompt": "Long?", "chosen": "x" * 100, "rejected": "no"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = run(make_recipe(tmp_path, [{"format": "preference", "path": str(path)}], max_length=40, test_size=0),
              tokenizer=char_tokenizer())
    report = json.loads((out / "report.json").read_text())
    assert report["sources"][0]["dropped"] == {"too_long": 1}
    # "user: Q?\n" + "assistant: " = 20 characters; "assistant: short\n" - "assistant: " = 6.
    assert report["token_lengths"]["prompt"]["max"] == 20
    assert report["token_lengths"]["chosen"]["max"] == 6
    assert report["token_lengths"]["rejected"]["max"] == 3


def test_best_vs_worst_keeps_the_extremes_and_drops_ties():
    prompt = next(preference_pairs(1, 0))["prompt"]
    judge = lambda prompt, text: float(len(text))
    example = best_vs_worst("p", prompt, ["bb", "a", "cccc"], judge, min_margin=0)
    assert (example.row["chosen"][0]["content"], example.row["rejected"][0]["content"]) == ("cccc", "a")
    assert best_vs_worst("p", prompt, ["a", "b"], judge, min_margin=0).reason == "tie"
    assert best_vs_worst("p", prompt, ["a", "bb"], judge, min_margin=5).reason == "small_margin"


def test_programmatic_judge_scores_synthetic_answers():
    prompt = [{"role": "user", "content": "Sort these digits: 3 1 2"}, {"role": "assistant", "content": "1 2 3"},
              {"role": "user", "content": "Now do the same for: 9 7 8"}]
    assert programmatic_judge(prompt, "The sorted digits are 7 8 9.") == 10
    assert programmatic_judge(prompt, "7 8 9") == 6
    assert programmatic_judge(prompt, "9 7 8") == 2


def save_tiny(model_class, folder, **extra):
    tokenizer = char_tokenizer()
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=1, **extra)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A random policy, and a random reward model whose scores differ between completions."""
    policy = save_tiny(MixtralForCausalLM, tmp_path_factory.mktemp("policy"))
    reward = save_tiny(MixtralForSequenceClassification, tmp_path_factory.mktemp("reward"), num_labels=1)
    return policy, reward


@pytest.mark.slow
def test_on_policy_source_samples_judges_and_pairs(tmp_path, tiny_models):
    policy, reward = tiny_models
    options = {"model": str(policy), "judge": str(reward), "synthetic": 3, "k": 3, "max_new_tokens": 8}
    source = {"format": "onpolicy", "options": options}
    out = run(make_recipe(tmp_path, [source], test_size=0))
    pairs = [json.loads(line) for line in (out / "preference/train.jsonl").read_text().splitlines()]
    assert len(pairs) == 3
    judge = reward_model_judge(str(reward))
    for pair in pairs:
        assert judge(pair["prompt"], pair["chosen"][0]["content"]) > judge(pair["prompt"], pair["rejected"][0]["content"])
    again = run(make_recipe(tmp_path / "again", [source], test_size=0))
    assert (again / "preference/train.jsonl").read_bytes() == (out / "preference/train.jsonl").read_bytes()


def test_programmatic_judge_drops_ties_of_a_random_policy(tmp_path, tiny_models):
    source = {"format": "onpolicy", "options": {"model": str(tiny_models[0]), "synthetic": 2, "k": 2, "max_new_tokens": 4}}
    training = {"format": "synthetic", "options": {"sft": 4, "pairs": 0, "questions": 0}}  # prep needs examples
    report = json.loads((run(make_recipe(tmp_path, [source, training])) / "report.json").read_text())["sources"][0]
    # Random characters are never a correct answer: every completion scores 1 or 2, so most prompts tie.
    assert report["kept"].get("preference", 0) + report["dropped"].get("tie", 0) == 2
