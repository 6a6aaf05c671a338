"""LoRA adapters chosen by role (attention, experts, shared_experts, dense_mlp, router) instead of by module name.

peft's `target_modules` cannot reach transformers-5 fused experts, and "all-linear" silently adapts the router.
Roles map to explicit targets found through the family registry: the Linears of attention, shared experts and
dense FFNs through `target_modules` (qualified names, so a shared expert's `down_proj` is not confused with a dense
layer's), the fused 3-D expert weights and the router weight through `target_parameters`. Anything not listed
stays frozen, `e_score_correction_bias` included.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from pathlib import Path

import peft
from peft.tuners.lora.layer import ParamWrapper
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import transformers_weight_conversion
from torch import nn

from finetune.core import distributed, families
from finetune.modeling import expert_parallel, expert_quant, moe, split_expert_lora
from finetune.config.recipe import LoraConfig

ALL_ROLES = ("attention", "experts", "shared_experts", "dense_mlp", "router")
MOE_ROLES = ("experts", "router")


def expand_roles(targets: list[str]) -> set[str]:
    return set(ALL_ROLES) if "all" in targets else set(targets)


def role_targets(model: nn.Module, roles: set[str]) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) of the roles."""
    modules = {"attention": attention_linear_targets, "shared_experts": shared_expert_targets,
               "dense_mlp": dense_mlp_targets}
    parameters = {"experts": expert_parameter_targets, "router": router_parameter_targets}
    target_modules = [name for role, find in modules.items() if role in roles for name in find(model)]
    target_parameters = [name for role, find in parameters.items() if role in roles for name in find(model)]
    return target_modules, target_parameters


def expert_parameter_targets(model: nn.Module) -> list[str]:
    """PEFT `target_parameters` names for the routed experts' 3-D parameters, e.g. ["mlp.experts.gate_up_proj",
    "mlp.experts.down_proj"] (named as in the module holding them: JetMoE's `mlp.input_linear.weight`)."""
    count = moe.config_expert_count(model)
    return sorted({f"{module_suffix(name)}.{param}" for name, module in moe.experts_modules(model).items()
                   for param in moe.expert_parameter_names(module, count)})


def module_suffix(name: str) -> str:
    """The last two parts of a module's name, as PEFT matches targets: `mlp.experts`; a module straight in a
    decoder layer (Gemma 4's `layers.3.experts`) by its own name, so the target is not one layer's index."""
    parent, own = name.split(".")[-2:] if "." in name else ("", name)
    return own if parent.isdigit() or not parent else f"{parent}.{own}"


def router_parameter_targets(model: nn.Module) -> list[str]:
    return sorted({f"{module_suffix(name)}.{moe.router_weight_name(model, name)}" for name in moe.routers(model)})


def router_role_refusal(model: nn.Module) -> str | None:
    """Why the router role cannot adapt this model's routers, or None. LoRA adds B A to a weight of one row per
    expert (E, hidden); a router whose scores come from anything else has no such weight to adapt."""
    for name, router in moe.routers(model).items():
        weight = moe.router_weight(model, name, router)
        experts = moe.num_experts(model, name, router)
        shape = moe.shape_of(weight)  # the whole weight's, also when ZeRO-3 holds a shard
        if len(shape) != 2 or not weight.is_floating_point() or shape[0] < experts:
            return (f"its router {name} scores the experts without a (experts, hidden) weight "
                    f"({moe.router_weight_name(model, name)}: {shape}) for LoRA to adapt; "
                    f"leave router out of model.lora.targets")
        bypassed = reads_child_weight_directly(router, moe.router_weight_name(model, name))
        if bypassed and not hasattr(router, "lora_read_child"):  # models moetune loads read it through the LoRA
            return (f"its router {name} reads {bypassed} itself (F.linear on the weight) instead of calling that "
                    f"module, and PEFT applies a weight's LoRA only inside its module's forward: the adapter would "
                    f"train nothing and change the model only when merged; leave router out of model.lora.targets")
    return None


def reads_child_weight_directly(router: nn.Module, weight_name: str) -> str | None:
    """`classifier.weight` when the router's forward uses `self.classifier.weight` rather than `self.classifier(x)`
    (LongCat-Flash): the child's LoRA wrapper, active only during the child's forward, is never applied."""
    child, _, param = weight_name.rpartition(".")
    if not child:
        return None
    try:
        source = inspect.getsource(type(router).forward)
    except (OSError, TypeError):  # no source to read (compiled, built in): assume it calls the module
        return None
    calls_child = f"self.{child}(" in source
    return weight_name if f"self.{child}.{param}" in source and not calls_child else None


def route_router_reads_through_lora(model: nn.Module) -> None:
    """Where a router reads its child's weight itself (LongCat-Flash: `F.linear(x, self.classifier.weight)`), the
    weight's LoRA is made active for the whole forward of the router, as PEFT makes it active for the forward of the
    module holding the weight: reads of `classifier.weight` then give W + scaling * B A (PEFT's own parametrization),
    so the router's adapter trains, and the unmerged model equals the merged one. moetune's loaders call this; hooks
    on the router, which PEFT leaves in place (it wraps the child), so any adapter added or loaded later is seen."""
    for name, router in moe.routers(model).items():
        bypassed = reads_child_weight_directly(router, moe.router_weight_name(model, name))
        if bypassed and not hasattr(router, "lora_read_child"):
            router.lora_read_child = bypassed.rpartition(".")[0]
            router.register_forward_pre_hook(activate_child_lora)
            router.register_forward_hook(deactivate_child_lora, always_call=True)


def activate_child_lora(router: nn.Module, args) -> None:
    """What ParamWrapper.forward does around its module's forward, around the router's (hooks take no closure over
    the router: a deep copy of the model keeps hooks that act on the copy)."""
    child = router.get_submodule(router.lora_read_child)
    if not isinstance(child, ParamWrapper) or child.disable_adapters or child.merged:
        return
    active = contextlib.ExitStack()
    active.enter_context(child._activate_lora(child.active_adapters))
    router.lora_reads_active = active


def deactivate_child_lora(router: nn.Module, args, output) -> None:
    active = router.__dict__.pop("lora_reads_active", None)
    if active is not None:
        active.close()


def linears_under(model: nn.Module, parents: list[str]) -> list[str]:
    """Qualified names of the Linear layers inside the named modules (those a LoRA wrapper can reach). A Linear
    subclass with a forward of its own (DeepSeek-V4's grouped output projection) is left out: LoRA's x @ A^T
    beside it would not match what its forward computes."""
    prefixes = tuple(parent + "." for parent in parents)
    unreachable = families.family_of(model).unreachable_linears
    return [name for name, module in model.named_modules() if is_plain_linear(module)
            and name.startswith(prefixes) and name.rsplit(".", 1)[-1] not in unreachable]


def is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def modules_named(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    return [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in names]


def attention_linear_targets(model: nn.Module) -> list[str]:
    """Linear layers of the token mixers: attention (MLA projections included), linear attention, Mamba. By
    structure: every Linear of a decoder layer outside its MoE block, shared experts, dense MLP and router."""
    family = families.family_of(model)
    if family.token_mixers is not None:
        return linears_under(model, modules_named(model, family.token_mixers))
    ffns = moe.structural_ffns(model)
    others = [*moe.moe_parts(model), *moe.routers(model), *ffns["shared_experts"], *ffns["dense_mlp"]]
    mixers = [name for layer in moe.decoder_layers(model) for name, module in moe.layer_children(model, layer)
              if not moe.NOT_A_MIXER_CLASS.search(type(module).__name__)]
    excluded = set(linears_under(model, others))
    return [name for name in linears_under(model, mixers) if name not in excluded]


def shared_expert_targets(model: nn.Module) -> list[str]:
    """Linear layers of the shared experts (the always-on FFN beside the routed experts)."""
    family = families.family_of(model)
    if family.shared_experts is None:
        return linears_under(model, moe.structural_ffns(model)["shared_experts"])
    return linears_under(model, modules_named(model, family.shared_experts))


def dense_mlp_targets(model: nn.Module) -> list[str]:
    """Linear layers of the dense FFNs of decoder layers without an MoE block (e.g. DeepSeek's first layers)."""
    family, blocks = families.family_of(model), set(moe.moe_blocks(model))
    if family.dense_mlp is None:
        return linears_under(model, moe.structural_ffns(model)["dense_mlp"])
    dense = [name for name in modules_named(model, (family.dense_mlp,))
             if name not in blocks and ".layers." in name and not moe.is_moe_subtree(model.get_submodule(name))]
    return linears_under(model, dense)


def no_moe_layers(model: nn.Module) -> str:
    """Why a model has no experts to adapt: a dense model, or routed experts stored in a way moetune cannot find."""
    declared = families.expert_count(model.config)
    if declared is None:
        return "this model has no MoE layers"
    return (f"this model's config declares {declared} routed experts and moetune finds no 3-D expert weights (one "
            f"matrix per expert along a leading experts dimension) in it: {model.config.model_type} stores its "
            "experts another way, which moetune does not adapt")


def peft_config(model: nn.Module, lora: LoraConfig) -> peft.LoraConfig:
    roles = expand_roles(lora.targets)
    if roles & set(MOE_ROLES) and not moe.is_moe_model(model):
        raise ValueError(f"model.lora.targets names experts/router, but {no_moe_layers(model)}; use attention.")
    refusal = router_role_refusal(model) if "router" in roles else None
    if refusal and "router" in lora.targets:
        raise ValueError(f"model.lora.targets: router cannot be tuned on this model: {refusal}.")
    if refusal:  # `all`: every role this model has
        roles.discard("router")
    target_modules, target_parameters = role_targets(model, roles)
    if not target_modules and not target_parameters:
        raise ValueError(f"model.lora.targets {lora.targets} finds no layer in this model; add attention or experts.")
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
    return split_expert_lora.use_split_expert_lora(expert_quant.use_quantized_expert_lora(config, model), model)


def convert_only_missing_targets(convert):
    """peft's v4 -> v5 target conversion, applied only to targets that name no module of the model.

    For families whose checkpoints transformers converts (DeepSeek, Qwen-Next, Hunyuan, ...), peft rewrites every
    target ending in `.gate_proj`/`.up_proj`/`.down_proj` (the v4 per-expert names) to the fused experts. A shared
    expert's or a dense layer's `gate_proj` ends the same way: the shared_experts and dense_mlp roles would silently
    adapt the routed experts instead, on creation and again when a saved adapter loads. A target that matches an
    existing module is a v5 name already and is kept as it is; only the others (real v4 names) are converted.

    "Matches" is peft's own rule: the module's qualified name, or a dotted suffix of it. peft shortens a list of 20
    or more qualified targets to the shortest suffixes that select the same modules (`shared_experts.up_proj` for
    every layer's `model.layers.N.mlp.shared_experts.up_proj`) and saves those, so a 4-layer model's saved adapter
    names suffixes; converting them would add the routed experts a second time at double rank and the saved
    weights would no longer fit (LoRA SFT -> LoRA DPO failed so for every family with shared experts).
    """

    @functools.wraps(convert)
    def guarded(peft_config, model, conversions):
        targets = peft_config.target_modules
        if peft_config.peft_type != peft.PeftType.LORA or not targets or isinstance(targets, str):
            return convert(peft_config, model, conversions)
        names = [name for name, _ in model.named_modules()]
        existing = {target for target in targets if matches_a_module(target, names)}
        peft_config.target_modules = set(targets) - existing
        convert(peft_config, model, conversions)
        peft_config.target_modules = set(peft_config.target_modules or ()) | existing

    return guarded


def matches_a_module(target: str, module_names: list[str]) -> bool:
    """Whether peft's `target_modules` entry `target` selects a module: its whole name or a dotted suffix of it."""
    suffix = "." + target
    return any(name == target or name.endswith(suffix) for name in module_names)


transformers_weight_conversion.convert_peft_config_for_transformers = convert_only_missing_targets(
    transformers_weight_conversion.convert_peft_config_for_transformers)


def convert_only_missing_keys(convert):
    """peft's conversion of a saved adapter's keys through the family's checkpoint renamings (transformers'
    conversion mapping, meant for adapters named as the original checkpoint), applied only to keys that name no
    module of the model.

    An adapter PEFT saved from a transformers-5 model names its modules as they are; renaming them again sends
    some to no module, and their weights are silently left at zero: Laguna's `mlp.shared_expert.` ->
    `mlp.shared_experts.` (an unescaped dot) turns `shared_experts.down_proj` into `shared_experts..down_proj`,
    Inkling 2's `sconv.weight_proj` -> `sconv.weight_proj.weight` misses its dynamic convolution's projection. A key
    whose module exists is kept as it is; only the others (real checkpoint names) are converted.
    """

    @functools.wraps(convert)
    def guarded(model, peft_config, adapter_state_dict, *args, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        names = {name for name, _ in base.named_modules()}
        current = {key: value for key, value in adapter_state_dict.items()
                   if key.removeprefix("base_model.model.").split(".lora_")[0] in names}
        others = {key: value for key, value in adapter_state_dict.items() if key not in current}
        return {**current, **(convert(model, peft_config, others, *args, **kwargs) if others else {})}

    return guarded


transformers_weight_conversion.convert_peft_adapter_state_dict_for_transformers = convert_only_missing_keys(
    transformers_weight_conversion.convert_peft_adapter_state_dict_for_transformers)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def merge_adapter(base: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """The one way moetune merges an adapter: `base` with the adapter in `adapter_dir` folded into its weights.

    peft's merge_and_unload, also for a base that ZeRO-3 loaded partitioned (each process holds a shard) and for one
    whose experts are split across processes (model.expert_parallel: each process adds the update to its shards).

    Merging adds the adapter's update to the full base weight, so under ZeRO-3 each adapted module's weights are
    gathered whole while it merges (one module at a time: a Mixtral layer's experts, 2.8 GB in bf16, not the model).
    """
    merged = merged_into(base, adapter_dir)
    # PEFT froze the base weights when it wrapped them and unloading leaves them frozen: the merged model trains like
    # a freshly loaded one (a full-fine-tuning stage on an adapter stage stopped with 'element 0 of tensors does not
    # require grad'); a stage that adds an adapter freezes them again.
    for param in merged.parameters():
        param.requires_grad_(True)
    return merged


def merged_into(base: nn.Module, adapter_dir: str | Path) -> nn.Module:
    if expert_parallel.is_split(base):
        return split_expert_lora.merge_adapter(base, adapter_dir)
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
