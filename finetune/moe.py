"""Routers and experts of transformers-5 MoE models: where they are, and how much load each expert gets.

Mixtral, Qwen3-MoE and OLMoE share one layout per decoder layer: `mlp.gate` is the router (a bare (E, H) weight
returning logits, top-k scores and top-k expert indices) and `mlp.experts` holds the fused 3-D parameters
`gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from finetune import distributed

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def is_router(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    # Under DeepSpeed ZeRO-3 a parameter is an empty shard outside forward; ds_shape keeps its real shape.
    shape = getattr(weight, "ds_shape", getattr(weight, "shape", ()))
    return hasattr(module, "top_k") and isinstance(weight, nn.Parameter) and len(shape) == 2 \
        and hasattr(module, "num_experts")


def is_experts(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Parameter) for name in EXPERT_PARAMETERS)


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """Router modules by qualified name, in layer order."""
    return {name: module for name, module in model.named_modules() if is_router(module)}


def is_moe_model(model: nn.Module) -> bool:
    return bool(routers(model))


def moe_block_classes(model: nn.Module) -> list[type]:
    """Classes of the sparse MoE blocks (a router and its experts side by side), e.g. [MixtralSparseMoeBlock]."""
    found = []
    for module in model.modules():
        children = list(module.children())
        if any(is_router(c) for c in children) and any(is_experts(c) for c in children) and type(module) not in found:
            found.append(type(module))
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


def expert_parameter_targets(model: nn.Module) -> list[str]:
    """PEFT `target_parameters` names for the fused experts, e.g. ["mlp.experts.gate_up_proj", ...]."""
    suffixes = set()
    for name, module in model.named_modules():
        if is_experts(module):
            suffixes.add(".".join(name.split(".")[-2:]))
    return sorted(f"{suffix}.{param}" for suffix in suffixes for param in EXPERT_PARAMETERS)


def router_parameter_targets(model: nn.Module) -> list[str]:
    return sorted({".".join(name.split(".")[-2:]) + ".weight" for name in routers(model)})


def attention_linear_targets(model: nn.Module) -> list[str]:
    """Short names of the Linear layers inside attention blocks (q_proj, k_proj, ...)."""
    return sorted({name.split(".")[-1] for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and ".self_attn." in name})


def coefficient_of_variation(shares: list[float]) -> float:
    """Imbalance of one layer's expert load: 0 when balanced, sqrt(E-1) when one expert takes everything."""
    values = torch.tensor(shares, dtype=torch.float64)
    mean = values.mean()
    return float(values.std(unbiased=False) / mean) if mean > 0 else 0.0


class ExpertLoadTracker:
    """Counts, per MoE layer, how many real (non-padding) tokens each expert receives in training forwards.

    Forward hooks on the routers read their top-k indices; a pre-hook on the model reads the attention mask so
    padding does not count. Forwards without gradients (reference model, evaluation) are ignored.
    """

    def __init__(self, model: nn.Module):
        self.layers = list(routers(model))
        self.counts = {name: torch.zeros(module.num_experts, dtype=torch.long) for name, module in routers(model).items()}
        self.mask: torch.Tensor | None = None
        self.handles = [model.register_forward_pre_hook(self.remember_mask, with_kwargs=True)]
        for name, module in routers(model).items():
            self.handles.append(module.register_forward_hook(self.counter(name)))

    def remember_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.mask = mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def counter(self, name: str):
        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return
            indices = output[2].detach()
            if self.mask is not None and self.mask.numel() == indices.shape[0]:
                indices = indices[self.mask.to(indices.device)]
            self.counts[name] += torch.bincount(indices.reshape(-1).cpu(), minlength=len(self.counts[name]))
        return hook

    def take(self) -> dict[str, list[float]]:
        """Each layer's share of routed tokens per expert since the last call, over all processes; resets the counts.

        In a multi-process run every process must call this at the same step (Trainer logs on every process).
        """
        shares = {}
        for name, local_counts in self.counts.items():
            counts = distributed.sum_across_processes(local_counts.clone())
            local_counts.zero_()
            total = int(counts.sum())
            shares[name] = [round(int(c) / total, 6) for c in counts] if total else [0.0] * len(counts)
        return shares

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ExpertLoadCallback(TrainerCallback):
    """Adds expert-load imbalance to the trainer logs and writes the history to `expert_load.json`."""

    def __init__(self, model: nn.Module, output_file: Path):
        self.tracker = ExpertLoadTracker(model)
        self.output_file = Path(output_file)
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        shares = self.tracker.take()
        cvs = {layer: coefficient_of_variation(s) for layer, s in shares.items() if sum(s) > 0}
        if not cvs:
            return
        values = {"expert_load_cv_mean": round(sum(cvs.values()) / len(cvs), 4),
                  "expert_load_cv_max": round(max(cvs.values()), 4)}
        logs.update(values)  # printed and sent to loggers
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # the Trainer copied `logs` into the history before callbacks ran
        self.history.append({"step": state.global_step, "share": shares, "cv": cvs})

    def on_train_end(self, args, state, control, **kwargs):
        self.tracker.remove()
        if state.is_world_process_zero:
            self.output_file.write_text(json.dumps({"layers": self.tracker.layers, "history": self.history}, indent=1))


def expert_load_callbacks(model: nn.Module, folder: Path) -> list:
    """Expert-load tracking into folder/expert_load.json, for MoE models (none for a dense model)."""
    return [ExpertLoadCallback(model, folder / "expert_load.json")] if is_moe_model(model) else []
