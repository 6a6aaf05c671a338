"""Experts stored flat (DBRX): each projection of all experts as one 2-D (experts x rows, cols) matrix, seen by
moetune as 3-D expert weights, and written to disk as the checkpoint names them.

transformers 5.24's DbrxExpertGLU holds `w1`, `v1` and `w2` as (E*ffn, hidden) Parameters, and its parent
DbrxExperts slices them per expert itself: `self.mlp.w1.view(-1, ffn, hidden)[expert]` (w1 and v1 are used as
x @ w.T, w2 as h @ w2: stored (in, out) per expert). moetune finds routed experts as 3-D parameters with a leading
experts dimension (finetune/modeling/moe.py), so at load each of them is re-registered as a (E, ffn, hidden) view
of the same storage (no copy): DBRX's own forward is unchanged, as `.view(-1, ffn, hidden)` of that 3-D tensor is
the tensor itself. What writes or reads a state dict keeps DBRX's 2-D names and shapes (a state-dict hook
flattens them, a load hook re-stacks a 2-D tensor), so a merged save is a DBRX checkpoint that the unpatched class
loads, and a DBRX checkpoint loads into the patched model. Under DeepSpeed ZeRO-3 the view is the partitioned
parameter's logical shape (`stacked`), and the state dict DeepSpeed gathers for a save, past those hooks, is
flattened before Trainer writes it (`flatten_state_dict`, finetune/training/saving.py).

The weights are read by the parent, outside the forward of the module holding them, where PEFT applies a wrapped
parameter's LoRA (ParamWrapper re-parametrizes the weight only around its module's forward); the parent also
reads them through the attribute (`self.mlp.w1`) that PEFT's wrappers replace. So around the parent's forward
every wrapper's LoRA is made active and `mlp` is the module the wrappers hold: the reads give W + B A (or, for NF4
experts, the dequantized weights plus the update, read once per forward: expert_quant.reading_dequantized), and
the unmerged model equals the merged one.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from finetune.core import families
from finetune.modeling import adapters, expert_quant, moe


def stack_flat_experts(model: nn.Module) -> None:
    """View the family's flat expert matrices (families.Family.flat_experts) as (E, rows, cols) Parameters, and
    route the reads of a parent that slices them itself through their LoRA. Idempotent; nothing for other families."""
    names = families.family_of(model).flat_experts
    count = moe.config_expert_count(model)
    if not names or count is None:
        return
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if holds_flat(child, names, count):
                stack(child, names, count)
                if reads_child_weights(parent, child_name, names) and not hasattr(parent, "flat_experts_child"):
                    parent.flat_experts_child = child_name
                    parent.register_forward_pre_hook(activate_child_lora)
                    parent.register_forward_hook(adapters.deactivate_child_lora, always_call=True)


def holds_flat(module: nn.Module, names: tuple[str, ...], count: int) -> bool:
    """A module holding every one of `names` as a Parameter of E*rows rows (2-D), or already stacked (3-D)."""
    params = [module._parameters.get(name) for name in names]
    return all(isinstance(p, nn.Parameter) and len(moe.shape_of(p)) in (2, 3) and moe.shape_of(p)[0] % count == 0
               for p in params)


def stack(module: nn.Module, names: tuple[str, ...], count: int) -> None:
    for name in names:
        param = module._parameters[name]
        if len(moe.shape_of(param)) == 2:
            module._parameters[name] = stacked(param, count)
    if not hasattr(module, "flat_experts"):
        module.flat_experts = names
        module.register_state_dict_post_hook(flatten_on_save)
        module.register_load_state_dict_pre_hook(stack_on_load)


def stacked(param: nn.Parameter, count: int) -> nn.Parameter:
    """`param` (E*rows, cols) as (E, rows, cols): a view of the same storage, or under DeepSpeed ZeRO-3 the same
    Parameter with its logical shape changed.

    ZeRO-3 (from_pretrained under zero.Init) holds each parameter as a flat 1-D shard per process (`ds_tensor`),
    leaves an empty placeholder in `.data` and keeps the logical shape in `ds_shape`; every gather (forward,
    GatheredParameters, the 16-bit save) concatenates the shards and views them as `ds_shape`. A 2-D (E*rows, cols)
    and a 3-D (E, rows, cols) tensor have the same elements in the same order, so changing `ds_shape` alone makes
    every later gather 3-D; the Parameter itself must stay (DeepSpeed and its optimizer know it by identity)."""
    if not hasattr(param, "ds_shape"):
        return nn.Parameter(param.detach().view(count, -1, param.shape[-1]), requires_grad=param.requires_grad)
    rows, cols = param.ds_shape
    param.ds_shape = torch.Size((count, rows // count, cols))
    if param.data.numel() == param.ds_numel:  # gathered at this moment (at load every parameter is partitioned)
        param.data = param.data.view(param.ds_shape)
    return param


def flatten_on_save(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """The checkpoint's own 2-D (E*rows, cols) tensors, under the checkpoint's own names."""
    for name in module.flat_experts:
        tensor = state_dict.get(prefix + name)
        if tensor is not None and tensor.dim() == 3:
            state_dict[prefix + name] = flat(tensor)


def flatten_state_dict(model: nn.Module, state_dict: dict) -> dict:
    """A state dict of `model` gathered without `model.state_dict()` (DeepSpeed ZeRO-3's 16-bit save gathers each
    parameter in its `ds_shape` and skips the state-dict hooks), with the flat experts in the checkpoint's 2-D
    shapes, as flatten_on_save writes them. In place; returns it."""
    for prefix, module in model.named_modules():
        for name in getattr(module, "flat_experts", ()):
            key = f"{prefix}.{name}" if prefix else name
            if key in state_dict and state_dict[key].dim() == 3:
                state_dict[key] = flat(state_dict[key])
    return state_dict


def flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1])


def stack_on_load(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """A checkpoint's 2-D tensor loaded into the stacked (E, rows, cols) Parameter."""
    for name in module.flat_experts:
        tensor, param = state_dict.get(prefix + name), module._parameters.get(name)
        if tensor is not None and param is not None and tensor.dim() == 2 and param.dim() == 3:
            state_dict[prefix + name] = tensor.reshape(param.shape)


def reads_child_weights(parent: nn.Module, child_name: str, names: tuple[str, ...]) -> bool:
    """Whether the parent's forward reads the child's weights itself (`self.mlp.w1`), as DbrxExperts does."""
    try:
        source = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):  # no source to read (compiled, built in)
        return False
    return any(f"self.{child_name}.{name}" in source for name in names)


def lora_wrappers(module: nn.Module) -> list[ParamWrapper]:
    """PEFT's nested parameter wrappers around a module, outermost first (one per adapted parameter)."""
    wrappers = []
    while isinstance(module, ParamWrapper):
        wrappers.append(module)
        module = module.base_layer
    return wrappers


def activate_child_lora(parent: nn.Module, args) -> None:
    """What each ParamWrapper.forward does around its module's forward, around the parent's, with `mlp` the module
    they wrap (hooks take no closure over the module: a deep copy of the model keeps hooks that act on the copy)."""
    name = parent.flat_experts_child
    wrapped = parent._modules[name]
    held = wrapped.get_base_layer() if isinstance(wrapped, ParamWrapper) else wrapped
    active = contextlib.ExitStack()
    for wrapper in lora_wrappers(wrapped):
        if not wrapper.disable_adapters and not wrapper.merged:
            active.enter_context(wrapper._activate_lora(wrapper.active_adapters))
    if expert_quant.is_quantized_experts(held):
        active.enter_context(expert_quant.reading_dequantized(held))
    parent._modules[name] = held
    active.callback(parent._modules.__setitem__, name, wrapped)
    parent.lora_reads_active = active  # closed by adapters.deactivate_child_lora, as for routers

