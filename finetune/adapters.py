"""LoRA adapters chosen by role (attention, experts, router) instead of by module name.

peft's `target_modules` cannot reach transformers-5 fused experts, and "all-linear" silently adapts the router.
Roles map to explicit targets: attention Linears through `target_modules`, the fused 3-D expert weights and the
router weight through `target_parameters`. Anything not listed stays frozen.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import peft
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from finetune import distributed, expert_quant, moe
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
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=dropout,
        target_modules=target_modules or None,
        target_parameters=target_parameters or None,
        task_type="CAUSAL_LM",
    )
    return expert_quant.use_quantized_expert_lora(config, model)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def merge_adapter(base: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """The one way moetune merges an adapter: `base` with the adapter in `adapter_dir` folded into its weights.

    peft's merge_and_unload, also for a base that ZeRO-3 loaded partitioned (each process holds a shard).

    Merging adds the adapter's update to the full base weight, so under ZeRO-3 each adapted module's weights are
    gathered whole while it merges (one module at a time: a Mixtral layer's experts, 2.8 GB in bf16, not the model).
    """
    peft_model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    if not distributed.zero3_enabled():
        return peft_model.merge_and_unload()
    import deepspeed  # DeepSpeed is optional: imported only under ZeRO-3

    # Every tuner merges its own tensor, nested ones too (the two fused expert tensors of one module are wrapped
    # one inside the other); unload() then removes the wrappers, like merge_and_unload.
    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
                module.merge()
    return peft_model.unload()
