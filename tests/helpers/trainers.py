"""TRL's DPO and SFT trainers on a tiny model and one batch, to compare moetune's packed trainers with (the speed
levers' tests and the per-family conformance tests)."""

from __future__ import annotations

import copy

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from finetune.config.recipe import LoraConfig
from finetune.core import synthetic_task
from finetune.modeling import adapters
from finetune.training.packed_sft import PaddingFreeSFTTrainer
from helpers.on_device import DTYPE, trainer_options
from helpers.parity import SAME_MATH, loss_and_gradients, relative_differences


def dpo_config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), **trainer_options(), report_to="none", per_device_train_batch_size=8,
                  max_length=90, beta=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], seed=0)
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


def whole_dataset(trainer):
    return [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]


def reference_log_probs(trainer):
    """Each sequence's summed completion log-probs under the reference (chosen then rejected), on one batch."""
    batch = trainer._prepare_inputs(trainer.data_collator(whole_dataset(trainer)))
    with torch.no_grad():
        return torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))


def same_math(reference, candidate):
    """The candidate trainer's loss and every gradient equal the reference's (on the whole dataset as one batch)."""
    result = loss_and_gradients(candidate, whole_dataset(candidate))
    assert reference[1].keys() == result[1].keys()
    loss_difference, gradient_difference = relative_differences(reference, result)
    loss_tolerance, gradient_tolerance = SAME_MATH[str(DTYPE).split(".")[-1]]
    assert loss_difference < loss_tolerance and gradient_difference < gradient_tolerance


def sft_trainers(model, tokenizer, tmp_path, conversations: int, max_length: int):
    """TRL's SFTTrainer and the padding-free one on copies of `model`, one batch of synthetic conversations."""
    dataset = Dataset.from_list(list(synthetic_task.sft_conversations(conversations, 4)))
    trainers = []
    for trainer_class in (SFTTrainer, PaddingFreeSFTTrainer):
        config = SFTConfig(output_dir=str(tmp_path), **trainer_options(), report_to="none", max_length=max_length,
                           per_device_train_batch_size=conversations, assistant_only_loss=True, seed=0)
        trainers.append(trainer_class(model=copy.deepcopy(model), args=config, train_dataset=dataset,
                                      processing_class=tokenizer))
    return trainers
