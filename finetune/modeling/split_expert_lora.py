"""LoRA on experts split across processes (model.expert_parallel): PEFT's adapter, each process adding the update of
the experts it holds.

PEFT's LoRA on fused experts (`target_parameters`, its ParamWrapper) re-parametrizes the whole 3-D parameter as
W + scaling * B A. With the experts split, W is a DTensor (each process holds E / N experts, FSDP2 manages it) and the
factors plain tensors, which torch refuses to combine ('aten.baddbmm.default got mixed torch.Tensor and DTensor');
the re-parametrization would also read W outside FSDP2's unshard, where a process may hold only a slice of its own
experts.

Here the factors stay PEFT's, for all E experts (lora_A (E r, in), lora_B (out, E r)), plain tensors replicated on
every process like the adapters of attention: transformers' Trainer broadcasts such parameters from process 0 and
averages their gradients over all processes (`_sync_replicated_trainable_parameters`). What changes is where the
update is added. transformers runs the split experts' forward on their local tensors (`_use_local_dtensor_params`, the
experts this process holds, each whole); a property on the experts module reads the weight there and adds
scaling * B_e A_e for those experts only. A process's gradient of the other experts' factors is zero, and the
processes holding those experts computed theirs from every process's tokens (the all-to-all brought them), so the
average over processes is the gradient one process would get from the same global batch.

The saved adapter is an ordinary PEFT adapter of the whole model (`PeftModel.from_pretrained` on one process). Merging
an adapter into a split model adds each process's share of the update to the weight shards it holds.

Cost: the experts' factors, their gradients and Adam moments are whole on every process (16 bytes per adapter
parameter in fp32 training) while the experts themselves are split; the compute of the update is split with them.
"""

from __future__ import annotations

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.lora.layer import ParamWrapper
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from finetune.modeling import expert_parallel, expert_quant, moe


class LocalExpertsDelta:
    """The factors of one adapted expert parameter, added to the local experts' weight where the forward reads it."""

    def __init__(self, lhs: torch.Tensor, rhs: torch.Tensor, scaling: float, local: slice):
        self.lhs, self.rhs, self.scaling, self.local = lhs, rhs, scaling, local
        self.read_from, self.adapted = None, None

    def applied_to(self, weight: torch.Tensor) -> torch.Tensor:
        # The eager experts forward reads the weight once per expert: one update per forward (as PEFT's cached
        # parametrization), computed again when the weight object changes (the next forward, a recomputation).
        if self.read_from is not weight:
            with torch.autocast(device_type=weight.device.type, enabled=False):
                self.adapted = torch.baddbmm(weight, self.lhs[self.local], self.rhs[self.local], alpha=self.scaling)
            self.read_from = weight
        return self.adapted


def local_experts(parameter) -> slice:
    """Which of the E experts this process holds: transformers cuts the expert dimension in contiguous equal parts
    over the `ep` dimension of the mesh (MoEParamShard, Shard(0))."""
    mesh = parameter.device_mesh
    size = mesh["ep"].size()
    local = parameter.shape[0] // size
    first = local * mesh["ep"].get_local_rank()
    return slice(first, first + local)


def read_with_local_delta(experts: nn.Module, name: str) -> None:
    """Make `experts.<name>` read as the weight plus the active adapter's update of the local experts.

    The weight stays registered as it is (FSDP2 and transformers swap it in `_parameters` while they gather it and
    run the local experts, and it saves unchanged); a property on a subclass made for this one module, as torch's
    parametrizations do, reads it from there."""
    if not hasattr(experts, "split_lora"):
        experts.split_lora = {}
        cls = type(experts)
        experts.__class__ = type(cls.__name__, (cls,), {"__module__": cls.__module__})

    def read(module):
        weight = module._parameters[name]
        delta = module.split_lora.get(name)
        if delta is None:
            return weight
        if expert_parallel.is_dtensor(weight):
            raise RuntimeError(f"LoRA on split experts: {name} was read as a whole DTensor while the adapter was "
                               f"active; only the expert-parallel forward (on the local experts) can add it.")
        return delta.applied_to(weight)

    setattr(type(experts), name, property(read))


class SplitExpertsLora(ParamWrapper):
    """PEFT's LoRA wrapper of a fused expert parameter whose experts are split across processes: same weights, names
    and config as ParamWrapper (so the adapter saves and loads like any PEFT adapter), applied per local expert."""

    def __init__(self, base_layer, adapter_name: str, parameter_name: str, config, **kwargs):
        super().__init__(base_layer, adapter_name, parameter_name=parameter_name, config=config, **kwargs)
        experts = self.get_base_layer()
        self.local = local_experts(experts._parameters[parameter_name])
        read_with_local_delta(experts, parameter_name)

    def _activate_lora(self, active_adapters: list[str]):
        return expert_quant.factors_handed_over(self, active_adapters, self.get_base_layer().split_lora,
                                                self.local_delta, "split experts")

    def local_delta(self, adapter: str) -> LocalExpertsDelta:
        return LocalExpertsDelta(*self.get_delta_factors(adapter), self.local)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError("an adapter on split experts is merged by split_expert_lora.merge_adapter")


# peft recognises parameter wrappers by class name (tuners_utils._inject_parameters) when it nests the second expert
# parameter's wrapper; ours must answer to that name (as expert_quant.QuantizedExpertsLora).
SplitExpertsLora.__name__ = SplitExpertsLora.__qualname__ = "ParamWrapper"


def use_split_expert_lora(config: PeftConfig, model: nn.Module) -> PeftConfig:
    """Make PEFT wrap `model`'s split experts with SplitExpertsLora (PEFT's custom-module dispatch); a whole model's
    config is returned as it is."""
    if not expert_parallel.is_split(model):
        return config
    classes = {type(module) for module in model.modules() if moe.is_experts(module)
               and any(expert_parallel.is_dtensor(p) for p in module.parameters(recurse=False))}
    if classes:
        config._register_custom_module({cls: SplitExpertsLora for cls in classes})
    return config


def merge_adapter(base: nn.Module, adapter_dir) -> nn.Module:
    """The adapter in `adapter_dir` folded into a split model's weights, each process adding the part of the update
    that falls on the weight shards it holds (PEFT's own merge, `weight.data += delta`, refuses a DTensor weight)."""
    config = use_split_expert_lora(PeftConfig.from_pretrained(str(adapter_dir)), base)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), config=config)
    for module in peft_model.modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "lora_A"):
            continue
        weight = module.get_param() if isinstance(module, ParamWrapper) else module.get_base_layer().weight
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                with torch.no_grad():
                    add_to_shards(weight, module.get_delta_weight(adapter))
    return peft_model.unload()


def add_to_shards(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """`weight += delta` for a whole `delta` and a weight that may be a DTensor (then only this process's shards)."""
    if expert_parallel.is_dtensor(weight):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every process holds the whole delta and keeps its own chunks; no communication
        delta = distribute_tensor(delta.to(weight.dtype), weight.device_mesh, weight.placements, src_data_rank=None)
        weight.to_local().add_(delta.to_local())
    else:
        weight.add_(delta.to(weight.dtype))
