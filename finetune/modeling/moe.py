"""Routers and experts of transformers-5 MoE models: where they are (finetune/training/expert_load.py and
finetune/training/routing_drift.py watch what they do in training).

Every transformers-5 MoE family has, per MoE layer, a block holding a router and an experts module with the fused
3-D parameters `gate_up_proj` and `down_proj`; the family registry (finetune/core/families.py) says what the router is
called, what it returns and where the shared experts, dense FFNs and token mixers are. The LoRA targets of each
role are listed beside the adapters (finetune/modeling/adapters.py).
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
from torch import nn
from peft.tuners.tuners_utils import BaseTunerLayer

from finetune.core import distributed, families

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def is_router(module: nn.Module) -> bool:
    """Remote-code routers of the older layout: a module with top_k, num_experts and a 2-D weight."""
    weight = getattr(module, "weight", None)
    # Under DeepSpeed ZeRO-3 a parameter is an empty shard outside forward; ds_shape keeps its real shape.
    shape = getattr(weight, "ds_shape", getattr(weight, "shape", ()))
    return hasattr(module, "top_k") and isinstance(weight, nn.Parameter) and len(shape) == 2 \
        and hasattr(module, "num_experts")


def shape_of(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))


def expert_parameter_names(module: nn.Module, count: int | None) -> list[str]:
    """The routed-expert parameters a module holds itself: 3-D, with a leading experts dimension (not a
    convolution's kernel)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return []
    if hasattr(module, "nf4_layouts"):  # NF4 experts: the quantized parameters, by name
        return list(module.nf4_layouts)
    return [name for name, param in module.named_parameters(recurse=False)
            if len(shape_of(param)) == 3 and (count is None or shape_of(param)[0] >= count)]


def is_fused_gate_up(module: nn.Module) -> bool:
    """Experts in transformers' usual layout (`gate_up_proj`, `down_proj`): the one the NF4 expert forward runs."""
    return all(isinstance(getattr(module, name, None), nn.Parameter) for name in EXPERT_PARAMETERS)


def is_experts(module: nn.Module, count: int | None = None) -> bool:
    return bool(expert_parameter_names(module, count))


def model_config(model: nn.Module):
    config = getattr(model, "config", None)
    return families.text_config(config) if config is not None else None


def config_expert_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return families.expert_count(config) if config is not None else None


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The routed-expert modules (fused 3-D parameters) by qualified name, inside the decoder layers."""
    count = config_expert_count(model)
    prefixes = tuple(layer + "." for layer in decoder_layers(model)) or ("",)
    # Under LoRA the experts sit inside PEFT's wrappers (`experts.base_layer.base_layer`): named as without them,
    # so the MoE block (their parent) is found the same way before and after the adapters are added.
    return {name.replace(".base_layer", ""): module for name, module in model.named_modules()
            if name.startswith(prefixes) and is_experts(module, count)}


def structural_router(model: nn.Module, block_name: str, block: nn.Module, count: int, experts: set[str]):
    """(name, weight name) of the router inside an MoE block: the module holding a 2-D weight with one row per
    expert (LongCat-Flash adds rows for its zero-computation experts), outside the experts. Where that weight sits
    in a Linear of a router module (AFMoE's `router.gate`, Gemma 4's `router.proj`), the router is the block's
    child holding it: its output has the experts chosen (with the balancing bias), the Linear's only logits."""
    def inside_experts(full: str) -> bool:
        return any(full == e or full.startswith(e + ".") for e in experts)

    for name, module in block.named_modules():
        full = f"{block_name}.{name}" if name else block_name
        if inside_experts(full) or any(part.startswith("lora_") for part in name.split(".")):
            continue  # PEFT's LoRA matrices (lora_A has r rows: r = expert count would look like a router)
        for weight_name, param in module.named_parameters(recurse=False):
            shape = shape_of(param)
            if len(shape) == 2 and count <= shape[0] < 2 * count and shape[1] != shape[0]:
                path = name.replace(".base_layer", "").split(".") if name else []  # named as before PEFT wrapped it
                child = f"{block_name}.{path[0]}"
                if len(path) > 1 and not inside_experts(child) and not any(
                        e.startswith(child + ".") for e in experts):
                    return child, ".".join(path[1:] + [weight_name])
                return full.replace(".base_layer", ""), weight_name
    return None


def structural_routers(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Router name -> (weight name, MoE block name) found by structure: for each experts module, the router in its
    parent (the MoE block), or in the grandparent, then the block (DBRX's DbrxFFN holds its router and DbrxExperts,
    which holds the module with the expert weights)."""
    count = config_expert_count(model)
    experts = experts_modules(model)
    found = {}
    for experts_name in experts:
        parent = experts_name.rsplit(".", 1)[0] if "." in experts_name else ""
        for block_name in (parent, parent.rsplit(".", 1)[0] if "." in parent else ""):
            if count is None or not block_name:
                break
            router = structural_router(model, block_name, model.get_submodule(block_name), count, set(experts))
            if router is not None:
                found.setdefault(router[0], (router[1], block_name))
                break
    return found


def family_router(family: families.Family, name: str, module: nn.Module) -> bool:
    if family.router == "":
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
    if family.router is None:
        found = structural_routers(model)
        if found or config_expert_count(model) is not None:
            return {name: unwrapped(model.get_submodule(name)) for name in found}
        family = replace(family, router="")  # a remote-code model without an expert count: the older rule
    return {name: module for name, module in unwrapped_modules(model) if family_router(family, name, module)}


def unwrapped(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def unwrapped_modules(model: nn.Module):
    """(name, module) of the model's modules as they were before PEFT wrapped any of them: a LoRA wrapper is
    replaced by the module it wraps, under the wrapper's name, and the wrapper's insides are skipped."""
    for name, module in model.named_modules():
        if "base_layer" in name.split("."):
            continue
        yield name, unwrapped(module)


def router_weight_name(model: nn.Module, router_name: str) -> str:
    family = families.family_of(model)
    if family.router is not None and family.router != "":
        return family.router_weight
    return structural_routers(model).get(router_name, ("weight",))[0]


def router_weight(model: nn.Module, router_name: str, router: nn.Module) -> nn.Parameter:
    return router.get_parameter(router_weight_name(model, router_name))


def num_experts(model: nn.Module, router_name: str, router: nn.Module) -> int:
    """Routed experts behind a router: the config's count, else the router weight's rows."""
    return config_expert_count(model) or shape_of(router_weight(model, router_name, router))[0]


def routing_sizes(model: nn.Module) -> tuple[int, int]:
    """(experts per MoE layer, experts per token), read from the first router."""
    name, router = next(iter(routers(model).items()))
    top_k = getattr(router, "top_k", None) or families.experts_per_token(model.config)
    return num_experts(model, name, router), top_k


def top_k_indices(family: families.Family, output, router: nn.Module, sizes: tuple[int, int]) -> torch.Tensor:
    """The experts each token was routed to, from a router's output."""
    if family.top_k_indices is not None:
        return family.top_k_indices(output, router)
    return families.indices_generic(output, router, *sizes)


def router_logits(family: families.Family, output, sizes: tuple[int, int]) -> torch.Tensor:
    if family.router_logits is not None:
        return family.router_logits(output)
    return families.logits_generic(output, sizes[0])


def is_moe_model(model: nn.Module) -> bool:
    return bool(routers(model))


def moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The sparse MoE blocks (the modules holding a router and its experts) by qualified name."""
    if families.family_of(model).router is None:
        names = {block for _, block in structural_routers(model).values()}
    else:
        names = {name.rsplit(".", 1)[0] for name in routers(model)}
    return {name: module for name, module in model.named_modules() if name in names}


def moe_block_classes(model: nn.Module) -> list[type]:
    """Classes of the sparse MoE blocks, e.g. [MixtralSparseMoeBlock]: the ZeRO-3 leaf modules."""
    return list(dict.fromkeys(type(module) for module in moe_blocks(model).values()))


def decoder_layer_classes(model: nn.Module) -> list[type]:
    """Classes of the decoder layers (the modules directly above the MoE blocks): what FSDP2 wraps one by one.

    Hybrid models have two (e.g. Jamba's attention and Mamba layers)."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:  # a backbone not called `model` (DBRX's `transformer.blocks`)
        layers = [model.get_submodule(name) for name in decoder_layers(model)]
    return list(dict.fromkeys(type(layer) for layer in layers))


def bias_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The aux-loss-free balancing biases (`e_score_correction_bias`) of each MoE block, by block name."""
    found = {}
    for block_name, block in moe_blocks(model).items():
        for name, tensor in [*block.named_buffers(), *block.named_parameters()]:
            if families.is_balancing_bias(name):
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


# What families call the ModuleList of their decoder layers: `layers`, DBRX's `blocks`.
DECODER_LAYER_LISTS = ("layers", "blocks")


def decoder_layers(model: nn.Module) -> list[str]:
    """Qualified names of the decoder layers: the entries of the model's first `layers` ModuleList (else of its
    first `blocks` one)."""
    for list_name in DECODER_LAYER_LISTS:
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == list_name and len(module):
                return [f"{name}.{index}" for index in range(len(module))]
    return []


def linear_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())


# The class of an FFN child of a decoder layer (beside attention): its name says so in every transformers family.
MLP_CLASS = re.compile(r"MLP|FeedForward|FFN|Expert", re.IGNORECASE)
# Children of a decoder layer that mix neither tokens nor features: norms, hyper-connection mixing weights.
NOT_A_MIXER_CLASS = re.compile(r"Norm|HyperConnection|Residual", re.IGNORECASE)


def layer_children(model: nn.Module, layer: str) -> list[tuple[str, nn.Module]]:
    """A decoder layer's children by qualified name; the entries of a ModuleList child (LongCat-Flash's two
    attentions and two MLPs per layer) count as children."""
    children = []
    for child, module in model.get_submodule(layer).named_children():
        if isinstance(module, nn.ModuleList):
            children += [(f"{layer}.{child}.{index}", item) for index, item in enumerate(module)]
        else:
            children.append((f"{layer}.{child}", module))
    return children


def moe_parts(model: nn.Module) -> list[str]:
    """What belongs to routing: the MoE blocks; where a family puts router and experts straight into the decoder
    layer (Gemma 4), just those two."""
    layers = set(decoder_layers(model))
    blocks = list(moe_blocks(model))
    routed = [*routers(model), *experts_modules(model)]
    inner = [name for block in blocks if block in layers for name, _ in layer_children(model, block)
             if any(r == name or r.startswith(name + ".") for r in routed)]
    return [block for block in blocks if block not in layers] + inner


def structural_ffns(model: nn.Module) -> dict[str, list[str]]:
    """Shared experts and dense MLPs found by structure.

    A shared expert is an FFN (two Linears or more) inside an MoE block beside its router and experts, or an FFN
    child of a decoder layer that also routes (Gemma 4's MLP beside its experts, LongCat-Flash's MLPs). A dense MLP
    is an FFN child of a layer without an MoE block (its class says MLP, FeedForward or FFN)."""
    parts, routed = set(moe_parts(model)), set(routers(model)) | set(experts_modules(model))
    found = {"shared_experts": [], "dense_mlp": []}
    for layer in decoder_layers(model):
        has_block = any(part.startswith(layer + ".") for part in parts)
        for name, module in layer_children(model, layer):
            if name in routed:
                continue
            if name in parts:
                found["shared_experts"] += [f"{name}.{sub}" for sub, submodule in module.named_children()
                                            if not any(r == f"{name}.{sub}" or r.startswith(f"{name}.{sub}.")
                                                       for r in routed) and linear_count(submodule) >= 2]
            elif linear_count(module) and MLP_CLASS.search(type(module).__name__) and not is_moe_subtree(module):
                found["shared_experts" if has_block else "dense_mlp"].append(name)
    return found


def is_moe_subtree(module: nn.Module) -> bool:
    return any(is_experts(m) for m in module.modules())
