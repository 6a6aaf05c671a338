"""LoRA on experts split across processes (model.expert_parallel): PEFT's adapter, each process adding the update of
the experts it holds.

PEFT's LoRA on fused experts (`target_parameters`, its ParamWrapper) re-parametrizes the whole 3-D parameter as
W + scaling * B A. With the experts split, W is a DTensor (each process holds E / N experts, FSDP2 manages it) and the
factors plain tensors, which torch refuses to combine ('aten.baddbmm.default got mixed torch.Tensor and DTensor');
the re-parametrization would also read W outside FSDP2's unshard, where a process may hold only a slice of its own
experts.

The factors are split with their experts. Each process holds the rows of PEFT's lora_A (E r, in) (experts outer) and
the columns of lora_B (out, r E) (experts inner) of the experts it holds, as DTensors over the experts' `ep` mesh
(lora_A Shard(0); lora_B _StridedShard(1, split_factor=r): r runs of E columns, each cut like the experts), so
`full_tensor()` is PEFT's whole tensor. transformers runs the split experts' forward on their local tensors
(`_use_local_dtensor_params`, the experts this process holds, each whole); a property on the experts module reads the
weight there and adds scaling * B_e A_e from the local factors. The processes holding an expert computed its
factors' gradient from every process's tokens (the all-to-all brought them), so no process adds another's experts'
gradients: each divides its own by the number of batches (and sums with the other holders of the same experts when
there are several, the `efsdp` mesh dimension). transformers' Trainer broadcasts and averages the other adapters
(attention, shared experts), plain tensors replicated on every process (`_sync_replicated_trainable_parameters`), and
leaves DTensors alone.

Whatever needs the whole adapter gathers it: the factors' `state_dict()` entries are the whole tensors (a
collective: saving the adapter, its checkpoints and push write PEFT's layout, equal to one process's), and loading a
whole adapter keeps each process's part. The Adam moments are DTensors like their factors (split_checkpoints.py saves
each process's part). Merging an adapter into a split model adds each process's update to the weight shards it holds.

Cost per process: 1/N of the routed experts' factors, their gradients and moments (N = model.expert_parallel).
"""

from __future__ import annotations

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.lora.layer import ParamWrapper
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from finetune.modeling import expert_parallel, expert_quant, moe


class LocalExpertsDelta:
    """The local factors of one adapted expert parameter, added to the local experts' weight where the forward reads
    it."""

    def __init__(self, lhs: torch.Tensor, rhs: torch.Tensor, scaling: float):
        self.lhs, self.rhs, self.scaling = lhs, rhs, scaling
        self.read_from, self.adapted = None, None

    def applied_to(self, weight: torch.Tensor) -> torch.Tensor:
        # The eager experts forward reads the weight once per expert: one update per forward (as PEFT's cached
        # parametrization), computed again when the weight object changes (the next forward, a recomputation).
        if self.read_from is not weight:
            with torch.autocast(device_type=weight.device.type, enabled=False):
                self.adapted = torch.baddbmm(weight, self.lhs, self.rhs, alpha=self.scaling)
            self.read_from = weight
        return self.adapted


def experts_mesh(parameter):
    """The mesh dimension transformers cuts the expert dimension over (MoEParamShard, Shard(0)): contiguous equal
    parts, process i of `ep` holding the i-th."""
    return parameter.device_mesh["ep"]


def factor_placements(lora_rank: int):
    """How lora_A (E r, in) and lora_B (out, r E) split with their experts over the `ep` mesh: lora_A's rows are
    expert-major (a contiguous block per process), lora_B's columns rank-major (r runs of E, each run cut alike)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return [Shard(0)], [_StridedShard(1, split_factor=lora_rank)]


def split_factor(layer: nn.Linear, mesh, placements) -> None:
    """Replace `layer.weight` (whole, as PEFT created it) by this process's part of process 0's tensor."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    whole = layer.weight.detach()
    dist.broadcast(whole, src=0)  # every process starts from process 0's factors, as from one process's
    # src_data_rank=None: each process keeps its own part of the (now equal) whole tensor, without communication
    part = distribute_tensor(whole, mesh, placements, src_data_rank=None)
    layer.weight = nn.Parameter(part, requires_grad=layer.weight.requires_grad)
    if not getattr(layer, "gathers_whole", False):
        layer.register_state_dict_post_hook(whole_in_state_dict)
        layer.register_load_state_dict_pre_hook(part_of_loaded)
        layer.gathers_whole = True


def whole_in_state_dict(layer, state_dict, prefix, local_metadata) -> None:
    """A split factor's state_dict entry is the whole tensor (gathered: every process calls state_dict together), so
    PEFT saves the adapter in its layout, as one process would."""
    key = prefix + "weight"
    state_dict[key] = expert_parallel.whole_tensor(state_dict[key]).detach()


def part_of_loaded(layer, state_dict, prefix, *args) -> None:
    """A whole factor loaded into a split one (PEFT's load_adapter, a checkpoint's adapter): this process's part."""
    from torch.distributed.tensor import distribute_tensor

    key, weight = prefix + "weight", layer.weight
    if key in state_dict and not expert_parallel.is_dtensor(state_dict[key]):
        state_dict[key] = distribute_tensor(state_dict[key].to(weight.dtype), weight.device_mesh, weight.placements,
                                            src_data_rank=None)


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
    """PEFT's LoRA wrapper of a fused expert parameter whose experts are split across processes: same names and config
    as ParamWrapper (so the adapter saves and loads like any PEFT adapter), its factors split like the experts and
    applied per local expert."""

    def __init__(self, base_layer, adapter_name: str, parameter_name: str, config, **kwargs):
        super().__init__(base_layer, adapter_name, parameter_name=parameter_name, config=config, **kwargs)
        read_with_local_delta(self.get_base_layer(), parameter_name)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)  # PEFT's whole factors, initialised
        mesh = experts_mesh(self.get_base_layer()._parameters[self.parameter_name])
        for layer, placements in zip((self.lora_A[adapter_name], self.lora_B[adapter_name]), factor_placements(r)):
            split_factor(layer, mesh, placements)

    def _activate_lora(self, active_adapters: list[str]):
        return expert_quant.factors_handed_over(self, active_adapters, self.get_base_layer().split_lora,
                                                self.local_delta, "split experts")

    def local_delta(self, adapter: str) -> LocalExpertsDelta:
        return LocalExpertsDelta(*self.local_factors(adapter))

    def local_factors(self, adapter: str):
        """PEFT's get_delta_factors on this process's experts: `(lhs, rhs, scaling)`, the local experts' update being
        `scaling * lhs @ rhs`. `to_local()` carries the gradient back to the split factor."""
        weight_a, weight_b = self.lora_A[adapter].weight.to_local(), self.lora_B[adapter].weight.to_local()
        experts = weight_a.shape[0] // self.r[adapter]
        weight_a = weight_a.reshape(experts, -1, weight_a.shape[-1])  # (experts, rank, in)
        weight_b = weight_b.reshape(weight_b.shape[0], -1, experts).permute(2, 0, 1)  # (experts, out, rank)
        if not self._did_swap_in_out_features:  # stored as (experts, in, out)
            lhs, rhs = weight_a.transpose(-2, -1), weight_b.transpose(-2, -1)
        else:
            lhs, rhs = weight_b, weight_a
        dtype = self.get_base_layer()._parameters[self.parameter_name].dtype
        return lhs.to(dtype), rhs.to(dtype), self.scaling[adapter]

    def merge_into_shards(self, adapter: str) -> None:
        """Add the adapter's update to the weight: this process's experts' update to the shards it holds."""
        weight = self.get_base_layer()._parameters[self.parameter_name]
        lhs, rhs, scaling = self.local_factors(adapter)
        with torch.no_grad():
            delta = torch.bmm(lhs, rhs) * scaling
            local = weight.to_local()
            if local.shape == delta.shape:  # each expert whole on one process (efsdp 1): nothing to exchange
                local.add_(delta.to(local.dtype))
            else:  # the experts FSDP-sharded further over their holders: the layer's update gathered, then cut alike
                from torch.distributed.tensor import DTensor, Shard

                whole = DTensor.from_local(delta, experts_mesh(weight), [Shard(0)]).full_tensor()
                add_to_shards(weight, whole)

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


def average_factor_gradients(model: nn.Module, window_ends) -> bool:
    """Make each split factor's gradient, at the end of an accumulation window (`window_ends()`), the average over
    every process's batch, as one process would get it from the whole global batch: summed over the processes that
    hold the same experts (none besides this one when each expert lives on one process) and divided by the number of
    batches. Another process's experts are never added in. Whether the model has split factors."""
    import torch.distributed as dist

    batches, found = dist.get_world_size(), False
    for module in model.modules():
        if not isinstance(module, SplitExpertsLora):
            continue
        holders = expert_holders(module.get_base_layer()._parameters[module.parameter_name].device_mesh)
        for layers in (module.lora_A, module.lora_B):
            for layer in layers.values():
                found = True
                if layer.weight.requires_grad and not getattr(layer.weight, "averages_batches", False):
                    layer.weight.register_post_accumulate_grad_hook(batch_average(holders, batches, window_ends))
                    layer.weight.averages_batches = True  # train() can run more than once: one hook
    return found


def batch_average(holders, batches: int, window_ends):
    def average(param) -> None:
        if window_ends():
            import torch.distributed as dist

            grad = param.grad.to_local()
            if holders is not None:
                dist.all_reduce(grad, group=holders)
            grad.div_(batches)

    return average


def expert_holders(mesh):
    """The process group holding the same experts as this process (the weight's mesh dimensions other than `ep`,
    transformers' `efsdp`), or None when this process is their only holder."""
    others = [name for name in mesh.mesh_dim_names or () if name != "ep"]
    if not others:
        return None
    group = (mesh[others[0]] if len(others) == 1 else mesh[tuple(others)]._flatten()).get_group()
    import torch.distributed as dist

    return group if dist.get_world_size(group) > 1 else None


def held_factor_elements(model: nn.Module) -> tuple[int, int]:
    """(elements this process holds, elements of the whole tensors) of the routed experts' LoRA factors."""
    factors = [layer.weight for module in model.modules() if isinstance(module, SplitExpertsLora)
               for layers in (module.lora_A, module.lora_B) for layer in layers.values()]
    return sum(f.to_local().numel() for f in factors), sum(f.numel() for f in factors)


def merge_adapter(base: nn.Module, adapter_dir) -> nn.Module:
    """The adapter in `adapter_dir` folded into a split model's weights, each process adding the part of the update
    that falls on the weight shards it holds (PEFT's own merge, `weight.data += delta`, refuses a DTensor weight)."""
    config = use_split_expert_lora(PeftConfig.from_pretrained(str(adapter_dir)), base)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), config=config)
    for module in peft_model.modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "lora_A"):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if isinstance(module, SplitExpertsLora):
                module.merge_into_shards(adapter)
            else:
                weight = module.get_param() if isinstance(module, ParamWrapper) else module.get_base_layer().weight
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
