"""Routers and experts of transformers-5 MoE models: where they are (finetune/training/expert_load.py and
finetune/training/routing_drift.py watch what they do in training).

Every transformers-5 MoE family has, per MoE layer, a block holding a router and an experts module with the fused
3-D parameters `gate_up_proj` and `down_proj`; the family registry (finetune/core/families.py) says what the router is
called, what it returns and where the shared experts, dense FFNs and token mixers are. The LoRA targets of each
role are listed beside the adapters (finetune/modeling/adapters.py).
"""

from __future__ import annotations

import torch
from torch import nn
from peft.tuners.tuners_utils import BaseTunerLayer

from finetune.core import distributed, families

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def is_router(module: nn.Module) -> bool:
    """Generic detection (remote-code models): a module with top_k, num_experts and a 2-D weight."""
    weight = getattr(module, "weight", None)
    # Under DeepSpeed ZeRO-3 a parameter is an empty shard outside forward; ds_shape keeps its real shape.
    shape = getattr(weight, "ds_shape", getattr(weight, "shape", ()))
    return hasattr(module, "top_k") and isinstance(weight, nn.Parameter) and len(shape) == 2 \
        and hasattr(module, "num_experts")


def is_experts(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Parameter) for name in EXPERT_PARAMETERS)


def family_router(family: families.Family, name: str, module: nn.Module) -> bool:
    if family is families.GENERIC:
        return is_router(module)
    return name.rsplit(".", 1)[-1] == family.router and has_parameter(module, family.router_weight)


def has_parameter(module: nn.Module, name: str) -> bool:
    try:
        return isinstance(module.get_parameter(name), nn.Parameter)
    except AttributeError:
        return False


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """Router modules by qualified name, in layer order; a router PEFT wrapped (the `router` LoRA role) is its base
    layer, which keeps the router's attributes (top_k, ...) and still runs in every forward of the wrapper."""
    family = families.family_of(model)
    return {name: module for name, module in unwrapped_modules(model) if family_router(family, name, module)}


def unwrapped_modules(model: nn.Module):
    """(name, module) of the model's modules as they were before PEFT wrapped any of them: a LoRA wrapper is
    replaced by the module it wraps, under the wrapper's name, and the wrapper's insides are skipped."""
    for name, module in model.named_modules():
        if "base_layer" in name.split("."):
            continue
        yield name, module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def router_weight(family: families.Family, router: nn.Module) -> nn.Parameter:
    return router.get_parameter(family.router_weight)


def num_experts(model: nn.Module, router: nn.Module) -> int:
    weight = router_weight(families.family_of(model), router)
    return getattr(weight, "ds_shape", weight.shape)[0]


def routing_sizes(model: nn.Module) -> tuple[int, int]:
    """(experts per MoE layer, experts per token), read from the first router."""
    router = next(iter(routers(model).values()))
    return num_experts(model, router), router.top_k


def is_moe_model(model: nn.Module) -> bool:
    return bool(routers(model))


def moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The sparse MoE blocks (the modules holding a router and its experts) by qualified name."""
    names = {name.rsplit(".", 1)[0] for name in routers(model)}
    return {name: module for name, module in model.named_modules() if name in names}


def moe_block_classes(model: nn.Module) -> list[type]:
    """Classes of the sparse MoE blocks, e.g. [MixtralSparseMoeBlock]: the ZeRO-3 leaf modules."""
    return list(dict.fromkeys(type(module) for module in moe_blocks(model).values()))


def decoder_layer_classes(model: nn.Module) -> list[type]:
    """Classes of the decoder layers (the modules directly above the MoE blocks): what FSDP2 wraps one by one.

    Hybrid models have two (e.g. Jamba's attention and Mamba layers)."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    return list(dict.fromkeys(type(layer) for layer in layers)) if layers is not None else []


def bias_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The aux-loss-free balancing biases (`e_score_correction_bias`) of each MoE block, by block name."""
    found = {}
    for block_name, block in moe_blocks(model).items():
        for name, tensor in [*block.named_buffers(), *block.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                found[block_name] = tensor
    return found


def mark_moe_blocks_as_zero3_leaves(model: nn.Module) -> None:
    """Under DeepSpeed ZeRO-3, gather each sparse MoE block's weights (router and all experts) as one unit.

    ZeRO-3 fetches a module's weights when its forward starts. Where each expert is its own module (transformers 4,
    remote-code models), experts that no token on a process was routed to never run there, so the processes ask for
    different weights and wait on each other forever (axolotl#1534, trl#1268). transformers 5 fuses the experts
    into one module that always runs (a 2-process ZeRO-3 run on the tiny model trains without this), but a leaf
    block is still one gather instead of several, and stays safe for per-expert layouts.
    The block class differs per architecture (MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock, OlmoeSparseMoeBlock),
    so it is found in the model rather than listed in the launch config (accelerate refuses names it cannot find).
    """
    if not distributed.zero3_enabled():
        return
    from deepspeed.utils import set_z3_leaf_modules  # DeepSpeed is optional: imported only under ZeRO-3

    classes = moe_block_classes(model)
    if classes:
        set_z3_leaf_modules(model, classes)
        if distributed.is_main_process():
            print(f"[zero3] MoE blocks gathered whole (ZeRO-3 leaf modules): {', '.join(c.__name__ for c in classes)}")
