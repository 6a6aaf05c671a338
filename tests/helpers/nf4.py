"""NF4 experts and LoRA in tests: a model's quantized copy, the full-precision model on the NF4-rounded expert
weights (what the NF4 forward must equal), and a seeded random adapter."""

from __future__ import annotations

import copy

import peft
import torch

from finetune.config.recipe import LoraConfig
from finetune.modeling import adapters, expert_quant, moe


def quantized_copy(model, double_quant=True):
    quantized = copy.deepcopy(model)
    expert_quant.quantize_experts(quantized, double_quant=double_quant, compute_dtype=model.dtype)
    return quantized


def experts_modules(model):
    """The routed-expert modules (NF4 or not), in the model's order."""
    return list(moe.experts_modules(model).values())


def dequantized_copy(model, quantized):
    """The full-precision model with its experts replaced by the NF4 round trip of their weights."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for target, source in zip(experts_modules(rounded), experts_modules(quantized)):
            for name in source.nf4_layouts:
                getattr(target, name).copy_(expert_quant.dequantized_parameter(source, name))
    return rounded


def random_lora_on(model, seed=1, targets=("attention", "experts")):
    """A PEFT adapter on the roles with seeded random weights (B non-zero, so it changes the model)."""
    peft_model = peft.get_peft_model(model, adapters.peft_config(model, LoraConfig(targets=list(targets))))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return peft_model.eval()
