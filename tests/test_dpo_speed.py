"""DPO speed levers (padding-free batches, prompt sharing, precomputed reference log-probs) keep TRL's math.

Each lever is compared, on one batch of a tiny Mixtral, against TRL's DPOTrainer on the padded batch: the loss
(DPO terms plus the router's load-balancing loss), the per-sequence log-probs and every adapter gradient agree.
"""

import copy

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from data_prep import synthetic
from finetune import adapters
from finetune.models import init_config, train_tokenizer
from finetune.packed_dpo import PackedDPOTrainer
from finetune.packed_sft import PaddingFreeSFTTrainer
from finetune.preference_packing import pack_pairs
from finetune.recipe import LoraConfig, ModelInit


@pytest.fixture(scope="module")
def tiny():
    """A tiny Mixtral (with its router's aux loss on), its tokenizer and 8 preference pairs of varied lengths."""
    pairs = list(synthetic.preference_pairs(8, 3))
    texts = [m["content"] for row in pairs for key in ("prompt", "chosen", "rejected") for m in row[key]]
    tokenizer = train_tokenizer(texts, vocab_size=200)
    init = ModelInit(hidden_size=32, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     num_experts=4, experts_per_token=2, router_aux_loss_coef=0.05)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(init_config(init, tokenizer))
    return model, tokenizer, Dataset.from_list(pairs)


def dpo_config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=8,
                  max_length=40, beta=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], seed=0)
    return DPOConfig(**{**values, **overrides})


def build(tiny, tmp_path, trainer_class=DPOTrainer, lora=True, trainer_options=None, **config):
    model, tokenizer, pairs = tiny
    model = copy.deepcopy(model)
    lora_config = adapters.peft_config(model, LoraConfig(targets=["attention", "experts"])) if lora else None
    trainer = trainer_class(model=model, ref_model=None if lora else copy.deepcopy(model).eval(),
                            args=dpo_config(tmp_path, **config), train_dataset=pairs, processing_class=tokenizer,
                            peft_config=lora_config, **(trainer_options or {}))
    if lora:  # LoRA B starts at zero, which would make the policy equal the reference: move it off
        torch.manual_seed(1)
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.05)
    return trainer


def loss_and_gradients(trainer):
    """The training loss on the whole dataset as one batch, and the gradient of every trainable parameter."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    loss.backward()
    grads = {name: param.grad.clone() for name, param in trainer.model.named_parameters() if param.requires_grad}
    return loss.detach(), grads


def assert_same_math(reference, candidate, rel=1e-4):
    (loss_a, grads_a), (loss_b, grads_b) = reference, candidate
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=rel)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = grads_a[name].abs().max().clamp(min=1e-8)
        assert ((grads_a[name] - grads_b[name]).abs().max() / scale).item() < rel, name


@pytest.mark.parametrize("share_prompt", [False, True])
def test_packed_batches_give_trl_loss_and_gradients(tiny, tmp_path, share_prompt):
    reference = loss_and_gradients(build(tiny, tmp_path))
    packed = build(tiny, tmp_path, PackedDPOTrainer, trainer_options={"share_prompt": share_prompt})
    assert_same_math(reference, loss_and_gradients(packed))


def test_padding_free_sft_gives_trl_loss_and_gradients(tiny, tmp_path):
    model, tokenizer, _ = tiny
    conversations = Dataset.from_list(list(synthetic.sft_conversations(8, 4)))
    results = []
    for trainer_class in (SFTTrainer, PaddingFreeSFTTrainer):
        config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=30,
                           per_device_train_batch_size=8, assistant_only_loss=True, seed=0)
        trainer = trainer_class(model=copy.deepcopy(model), args=config, train_dataset=conversations,
                                processing_class=tokenizer)
        results.append(loss_and_gradients(trainer))
    assert_same_math(*results)
