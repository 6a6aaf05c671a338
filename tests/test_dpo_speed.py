"""Speed levers (padding-free batches, prompt sharing, precomputed reference log-probs) keep TRL's math.

Each lever is compared, on one batch of a tiny Mixtral, against TRL's DPOTrainer (or SFTTrainer) on the padded
batch: the loss (with the router's load-balancing loss), the per-sequence log-probs and every gradient agree. The
reference cache is reused and invalidated as it should be, and a tiny DPO stage logs the same losses with the levers
on and off.
"""

import copy
import json

import pytest
import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from finetune.core import synthetic_task
from finetune.modeling import adapters
from finetune.training import packed_forward, scored_lm_head
from finetune.cli import main
from finetune.modeling.tiny import init_config, train_tokenizer
from finetune.training.packed_dpo import PackedDPOTrainer
from finetune.training.packed_sft import PaddingFreeSFTTrainer, sft_trainer
from finetune.training.preference_packing import pack_pairs
from finetune.config.recipe import LoraConfig, ModelInit, SpeedConfig
from helpers.on_device import DTYPE
from helpers.parity import SAME_MATH, loss_and_gradients
from helpers.trainers import build, dpo_config, reference_log_probs, same_math, sft_trainers, whole_dataset


@pytest.fixture(scope="module")
def tiny():
    """A tiny Mixtral (with its router's aux loss on), its tokenizer and 8 preference pairs of varied lengths."""
    pairs = list(synthetic_task.preference_pairs(8, 3))
    texts = [m["content"] for row in pairs for key in ("prompt", "chosen", "rejected") for m in row[key]]
    tokenizer = train_tokenizer(texts, vocab_size=200)
    init = ModelInit(hidden_size=32, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     num_experts=4, experts_per_token=2, router_aux_loss_coef=0.05)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(init_config(init, tokenizer), dtype=DTYPE)
    return model, tokenizer, Dataset.from_list(pairs)


@pytest.fixture(scope="module")
def trl_lora(tiny, tmp_path_factory):
    """TRL's DPOTrainer with LoRA on the padded batch: its loss, gradients and per-sequence log-probs."""
    trainer = build(tiny, tmp_path_factory.mktemp("trl"))
    return loss_and_gradients(trainer, whole_dataset(trainer)), reference_log_probs(trainer)


@pytest.mark.conformance
@pytest.mark.parametrize("share_prompt,tiled_lm_head", [(False, True), (True, True), (True, False)])
def test_packed_batches_give_trl_log_probs_loss_and_gradients(tiny, trl_lora, tmp_path, share_prompt, tiled_lm_head):
    reference, log_probs = trl_lora
    packed = build(tiny, tmp_path, PackedDPOTrainer,
                   trainer_options={"share_prompt": share_prompt, "tiled_lm_head": tiled_lm_head})
    packed_log_probs = reference_log_probs(packed)
    assert log_probs.numel() >= 10 and log_probs.abs().min() > 1  # 5+ pairs, real sums
    torch.testing.assert_close(packed_log_probs, log_probs, rtol=SAME_MATH[str(DTYPE).split(".")[-1]][0], atol=1e-4)
    same_math(reference, packed)


def test_reference_pass_computes_log_probs_only(tiny, tmp_path, monkeypatch):
    """TRL reads only the reference's log-probs: the reference pass (speed.reference_cache's, TRL's
    compute_ref_log_probs) skips the metrics' fields (entropy, top-1, mean logits), which the policy's forward still
    computes for the logs. (With the cache off TRL runs the reference inline in its loss, with every field.)"""
    asked = []
    original = packed_forward.scored_log_probs
    monkeypatch.setattr(packed_forward, "scored_log_probs",
                        lambda model, hidden, targets, fields, *args: asked.append(fields)
                        or original(model, hidden, targets, fields, *args))
    trainer = build(tiny, tmp_path, PackedDPOTrainer)
    reference_log_probs(trainer)
    assert asked == [("log_probs",)]
    asked.clear()
    loss_and_gradients(trainer, whole_dataset(trainer))
    assert asked[0] == ("log_probs", "entropy", "mean_logits", "is_top1")


@pytest.mark.conformance
def test_precomputed_reference_gives_the_per_step_loss_and_gradients(tiny, trl_lora, tmp_path):
    precomputed = build(tiny, tmp_path, PackedDPOTrainer, precompute_ref_log_probs=True)
    assert "ref_chosen_logps" in precomputed.train_dataset.column_names
    same_math(trl_lora[0], precomputed)


@pytest.mark.conformance
def test_full_fine_tuning_with_a_reference_copy_gives_trl_loss_and_gradients(tiny, tmp_path):
    trl = build(tiny, tmp_path, lora=False)
    same_math(loss_and_gradients(trl, whole_dataset(trl)), build(tiny, tmp_path, PackedDPOTrainer, lora=False))


@pytest.fixture(scope="module")
def sft_batch(tiny, tmp_path_factory):
    """TRL's SFTTrainer (assistant-only loss) on 8 conversations as one padded batch: loss, gradients and the
    logged entropy and token accuracy."""
    trainer = sft_build(tiny, tmp_path_factory.mktemp("sft"), lambda **kwargs: SFTTrainer(**kwargs))
    return loss_and_gradients(trainer, whole_dataset(trainer)), sft_metrics(trainer)


def sft_build(tiny, tmp_path, make):
    model, tokenizer, _ = tiny
    conversations = Dataset.from_list(list(synthetic_task.sft_conversations(8, 4)))
    config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=30,
                       per_device_train_batch_size=8, assistant_only_loss=True, seed=0)
    return make(model=copy.deepcopy(model), args=config, train_dataset=conversations, processing_class=tokenizer)


def sft_metrics(trainer):
    return {name: trainer._metrics["train"][name][-1] for name in ("entropy", "mean_token_accuracy")}


@pytest.mark.parametrize("padding_free,tiled_lm_head", [(False, True), (True, True), (True, False)])
def test_sft_levers_give_trl_loss_gradients_and_metrics(tiny, sft_batch, tmp_path, monkeypatch, padding_free,
                                                        tiled_lm_head):
    """The LM head on the assistant tokens only (with and without padding-free rows, in moetune's CPU tiles or
    TRL's kernel): TRL's loss, gradients and logged metrics, from fewer LM-head rows than TRL's CPU path scores."""
    head_rows = []
    original = scored_lm_head.scored_log_probs
    monkeypatch.setattr(scored_lm_head, "scored_log_probs",
                        lambda model, hidden, *args, **kwargs: head_rows.append(len(hidden))
                        or original(model, hidden, *args, **kwargs))
    speed = SpeedConfig(padding_free=padding_free, scored_lm_head=True, tiled_lm_head=tiled_lm_head)
    trainer = sft_build(tiny, tmp_path, lambda **kwargs: sft_trainer(speed, **kwargs))
    examples = whole_dataset(trainer)
    assert isinstance(trainer, PaddingFreeSFTTrainer) == padding_free
    same_math(sft_batch[0], trainer)
    assert sft_metrics(trainer) == pytest.approx(sft_batch[1], rel=1e-5)
    scored = (trainer.data_collator(examples)["labels"][:, 1:] != -100).sum().item()
    assert head_rows == [scored] and 0 < scored < sum(len(row["input_ids"]) for row in examples) / 2
@pytest.mark.conformance
def test_padding_free_sft_gives_trl_loss_and_gradients(tiny, tmp_path):
    model, tokenizer, _ = tiny
    trl, padding_free = sft_trainers(model, tokenizer, tmp_path, conversations=8, max_length=30)
    assert len(padding_free.train_dataset) > 1  # several sequences in the padding-free row
    same_math(loss_and_gradients(trl, whole_dataset(trl)), padding_free)


def test_layouts_place_every_token_where_trl_scores_it():
    examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
                {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}]
    shared = pack_pairs(examples, max_length=4, truncation_mode="keep_start", share_prompt=True)
    # pair 0: prompt 1 2 3, chosen cut to 4 (max_length 4), rejected 6; pair 1: 7 8 | 9 | 10 11
    assert shared["packed_input_ids"].tolist() == [[1, 2, 3, 4, 6, 7, 8, 9, 10, 11]]
    assert shared["packed_position_ids"].tolist() == [[0, 1, 2, 3, 3, 0, 1, 2, 2, 3]]
    assert shared["packed_blocks"].tolist() == [[0, 3, 4, 5], [5, 7, 8, 10]]
    assert shared["packed_router_weights"].tolist() == [[2, 2, 2, 1, 1, 2, 2, 1, 1, 1]]
    scored = list(zip(*(shared[f"packed_score_{k}"].tolist() for k in ("source", "token", "row", "col"))))
    # (hidden state that predicts it, token, padded row, column in TRL's shifted layout)
    assert scored == [(2, 4, 0, 2), (2, 6, 2, 2), (6, 9, 1, 1), (6, 10, 3, 1), (8, 11, 3, 2)]
    padding_free = pack_pairs(examples, max_length=4, truncation_mode="keep_start", share_prompt=False)
    assert padding_free["packed_input_ids"].tolist() == [[1, 2, 3, 4, 1, 2, 3, 6, 7, 8, 9, 7, 8, 10, 11]]
    assert padding_free["packed_blocks"].tolist() == [[0, 4, 4, 4], [4, 8, 8, 8], [8, 11, 11, 11], [11, 15, 15, 15]]


def test_reference_log_probs_are_cached_by_model_and_data(tiny, tmp_path, monkeypatch):
    """The reference pass runs on the first run only, and again only when what it computes changes: the model, the
    data or the batch layout. A new output dir, beta or learning rate (a re-run, a sweep) reuses it."""
    model, tokenizer, pairs = tiny
    calls = []
    original = PackedDPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(PackedDPOTrainer, "compute_ref_log_probs",
                        lambda self, *args: calls.append(1) or original(self, *args))

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    def reference_passes(base, data_file, output="out", **config):
        dataset = load_dataset("json", data_files=str(data_file), split="train", cache_dir=str(tmp_path / "cache"))
        calls.clear()
        torch.manual_seed(0)  # the same adapter initialisation every run
        args = dpo_config(tmp_path / output, precompute_ref_log_probs=True, **config)
        trainer = PackedDPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=dataset,
                                   processing_class=tokenizer,
                                   peft_config=adapters.peft_config(base, LoraConfig(targets=["experts"])))
        return len(calls), trainer.train_dataset["ref_chosen_logps"]

    rows = pairs.to_list()
    data = write("pairs.jsonl", rows)
    first, logps = reference_passes(model, data)
    again, cached = reference_passes(model, data)
    assert first > 0 and again == 0 and cached == logps
    assert reference_passes(model, data, output="sweep", beta=0.1, learning_rate=1e-5)[0] == 0
    assert reference_passes(model, data, max_length=60)[0] > 0
    changed_model = copy.deepcopy(model)
    with torch.no_grad():
        changed_model.lm_head.weight.mul_(1.01)
    assert reference_passes(changed_model, data)[0] > 0
    changed = write("changed.jsonl", [{**rows[0], "chosen": [{"role": "assistant", "content": "Something else."}]}]
                    + rows[1:])
    assert reference_passes(model, changed)[0] > 0


@pytest.mark.slow
def test_tiny_dpo_stage_with_levers_on_matches_levers_off(tiny_run_copy, tmp_path, monkeypatch):
    """End to end through the CLI: the DPO stage's logged losses are the same with every lever on and off, and a
    run with another beta reuses the finished run's reference pass."""
    reference_batches = []
    original = PackedDPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(PackedDPOTrainer, "compute_ref_log_probs",
                        lambda self, *args: reference_batches.append(1) or original(self, *args))
    recipe = str(tiny_run_copy[0])
    assert main(["dpo", recipe, "--force", "dpo.beta=0.3"]) == 0
    assert reference_batches  # the copied run's data: its reference pass is computed once
    reference_batches.clear()
    losses = {}
    for levers in ("true", "false"):
        overrides = [f"speed.{name}={levers}" for name in ("padding_free", "share_prompt", "reference_cache", "tiled_lm_head")]
        assert main(["dpo", recipe, "--force", *overrides]) == 0
        if levers == "true":
            assert reference_batches == []  # another beta: the same reference pass, reused
        history = json.loads((tmp_path / "run" / "dpo" / "metrics.json").read_text())
        losses[levers] = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses["true"]) == 3 and losses["true"] == pytest.approx(losses["false"], rel=1e-3)
