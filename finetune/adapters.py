"""LoRA adapters chosen by role (attention, experts, router) instead of by module name.

peft's `target_modules` cannot reach transformers-5 fused experts, and "all-linear" silently adapts the router.
Roles map to explicit targets: attention Linears through `target_modules`, the fused 3-D expert weights and the
router weight through `target_parameters`. Anything not listed stays frozen.
"""

from __future__ import annotations

import warnings

import peft
from torch import nn

from finetune import moe
from finetune.recipe import LoraConfig

ALL_ROLES = ("attention", "experts", "router")


def expand_roles(targets: list[str]) -> set[str]:
    return set(ALL_ROLES) if "all" in targets else set(targets)


def peft_config(model: nn.Module, lora: LoraConfig) -> peft.LoraConfig:
    roles = expand_roles(lora.targets)
    target_modules = moe.attention_linear_targets(model) if "attention" in roles else []
    target_parameters = []
    if "experts" in roles:
        target_parameters += moe.expert_parameter_targets(model)
    if "router" in roles:
        target_parameters += moe.router_parameter_targets(model)
    if ("experts" in roles or "router" in roles) and not moe.is_moe_model(model):
        raise ValueError("model.lora.targets names experts/router, but this model has no MoE layers; use attention.")
    dropout = lora.dropout
    if target_parameters and dropout:
        # peft's parameter wrappers refuse dropout; silently ignoring it would hide a setting the user chose.
        warnings.warn(f"model.lora.dropout={dropout} is set to 0: LoRA on expert/router parameters does not support dropout.")
        dropout = 0.0
    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=dropout,
        target_modules=target_modules or None,
        target_parameters=target_parameters or None,
        task_type="CAUSAL_LM",
    )


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]
