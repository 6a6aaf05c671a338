"""Padding-free and prompt-shared batches on families whose attention is not plain causal sdpa.

gpt-oss runs eager attention with attention sinks, and a sliding window in alternate layers: block attention runs its
own eager attention per block with the window applied, and must give TRL's padded loss, log-probs and gradients.
Hybrid families (linear attention, Mamba) run padding-free with their recurrent mixers sequence by sequence, and
say so (tests/test_packed_hybrids.py checks their math); a model that cannot (an attention implementation other
than sdpa or eager) falls back to padded batches with a note that names it and what is missing.
"""

import copy

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from finetune.core import synthetic_task
from finetune.training.packed_dpo import PackedDPOTrainer
from finetune.training.packed_forward import padding_free_for
from finetune.config.recipe import SpeedConfig
from helpers.lookalike import build_lookalike
from helpers.parity import loss_and_gradients
from helpers.trainers import build, reference_log_probs, same_math, sft_trainers, whole_dataset


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """A gpt-oss look-alike (sinks, 16-token window in layer 0), its tokenizer and 8 pairs longer than the window."""
    folder = build_lookalike("gpt_oss", tmp_path_factory.mktemp("gpt_oss"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config._attn_implementation == "eager" and model.config.sliding_window == 16
    return model, tokenizer, Dataset.from_list(list(synthetic_task.preference_pairs(8, 3)))


@pytest.fixture(scope="module")
def trl_padded(gpt_oss, tmp_path_factory):
    trainer = build(gpt_oss, tmp_path_factory.mktemp("trl"), max_length=320)
    return loss_and_gradients(trainer, whole_dataset(trainer)), reference_log_probs(trainer)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_packed_dpo_on_gpt_oss_gives_trl_log_probs_loss_and_gradients(gpt_oss, trl_padded, tmp_path, share_prompt):
    reference, log_probs = trl_padded
    packed = build(gpt_oss, tmp_path, PackedDPOTrainer, trainer_options={"share_prompt": share_prompt},
                   max_length=320)
    batch = packed.data_collator(whole_dataset(packed))
    assert batch["packed_input_ids"].shape[1] > 8 * 200  # each pair is many sliding windows long
    torch.testing.assert_close(reference_log_probs(packed), log_probs, rtol=1e-5, atol=1e-4)
    same_math(reference, packed)


def test_block_attention_applies_the_sliding_window(gpt_oss, trl_padded, tmp_path):
    """Without the window in layer 0 the packed log-probs move: the comparison above can see a missing window."""
    model, tokenizer, pairs = gpt_oss
    widened = copy.deepcopy(model)
    widened.model.layers[0].self_attn.sliding_window = None
    packed = build((widened, tokenizer, pairs), tmp_path, PackedDPOTrainer, max_length=320)
    assert (reference_log_probs(packed) - trl_padded[1]).abs().max() > 1e-3


def test_padding_free_sft_on_gpt_oss_gives_trl_loss_and_gradients(gpt_oss, tmp_path):
    model, tokenizer, _ = gpt_oss
    trl, padding_free = sft_trainers(model, tokenizer, tmp_path, conversations=6, max_length=320)
    same_math(loss_and_gradients(trl, whole_dataset(trl)), padding_free)


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe_text", "jamba", "granitemoehybrid"])
def test_hybrid_families_run_padding_free_with_a_note(family, capsys):
    config = AutoConfig.for_model(family, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=128)
    model = AutoModelForCausalLM.from_config(config)
    assert padding_free_for(SpeedConfig(), model, "sft")
    note = capsys.readouterr().out
    assert f"[sft] padding-free rows for {family}: its recurrent token mixers (" in note
    assert "run sequence by sequence, each from a fresh state" in note and "padding_free is off" not in note
    assert not padding_free_for(SpeedConfig(padding_free=False), model, "sft")
    assert capsys.readouterr().out == ""


def test_a_model_that_cannot_run_padding_free_falls_back_with_a_note(capsys):
    """Every MoE family of transformers 5.24 runs padding-free with sdpa or eager attention; another attention
    implementation cannot be cut into blocks, so its batches are padded, with a note saying why."""
    config = AutoConfig.for_model("qwen3_moe", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=128, num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=64, intermediate_size=128)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flex_attention")
    assert not padding_free_for(SpeedConfig(), model, "dpo")
    note = capsys.readouterr().out
    assert note.startswith("[dpo] speed.padding_free is off for qwen3_moe: it runs flex_attention attention; ")
    assert "packed rows need sdpa or eager" in note and "batches are padded" in note
