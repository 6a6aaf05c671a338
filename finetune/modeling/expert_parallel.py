"""Expert parallelism: each MoE layer's experts split across processes, through transformers' DistributedConfig.

With `model.expert_parallel: N` in a launch of W processes, `from_pretrained` gets
`DistributedConfig(fsdp_size=W, ep_size=N)`: transformers' own layout for training (transformers/distributed/
mixin.py `maybe_distribute_model`). Every process reads its own batch. The experts' fused 3-D weights are cut along
the expert dimension (the family's `base_model_ep_plan`, style `grouped_gemm`), and each MoE layer sends every
(token, expert) pair to the process holding that expert and back with two all-to-alls (`AllToAllEP`). Everything
else (attention, router, embeddings) is FSDP2-sharded over all W processes; with N < W each expert is FSDP-sharded
over the W / N processes holding it. transformers sets the experts' gradient divisor so that they average over all W
batches like the rest.

The pinned transformers refuses `ep_size > 1` with `tp_size = fsdp_size = 1` ("ep_size must divide
fsdp_size * tp_size"), and a `tp_size` without a tensor-parallel plan; FSDP2 over all processes is the layout that
needs neither. A single process loads the model whole: the same math, which the multiprocess tests compare against.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager

import torch

from finetune.core import distributed
from finetune.config.recipe import ModelConfig
from finetune.core.rundir import StageError


def distributed_config(model: ModelConfig):
    """The DistributedConfig a training process loads its model with, or None (a single process, or EP off)."""
    size, processes = model.expert_parallel, distributed.world_size()
    if size == 1 or processes == 1:
        return None
    check_launch(size, processes)
    from transformers.distributed import DistributedConfig

    return DistributedConfig(fsdp_size=processes, ep_size=size)


def check_launch(size: int, processes: int) -> None:
    """Refuse the launches transformers' layout cannot serve, before anything loads."""
    if processes % size:
        raise StageError(f"model.expert_parallel is {size}, but this launch has {processes} processes: the processes "
                         f"must be a multiple of it (each group of {size} holds every expert once). Launch a "
                         f"multiple of {size} processes (--num-processes) or change model.expert_parallel.")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" \
            or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise StageError("model.expert_parallel shards the model itself (transformers' DistributedConfig, with FSDP2 "
                         "for the dense weights): launch it with `--accelerate ep` (or ddp), not a DeepSpeed or FSDP "
                         "accelerate config, which would shard it a second time.")


def check_experts_divide(config, size: int) -> None:
    """Every MoE layer's experts must split evenly (transformers raises the same later, mid-load)."""
    experts = next((getattr(config, name) for name in ("num_experts", "num_local_experts", "n_routed_experts",
                                                       "moe_num_experts") if getattr(config, name, None)), None)
    if experts is not None and experts % size:
        raise StageError(f"model.expert_parallel is {size}, but the model has {experts} experts per MoE layer: "
                         f"they cannot be split evenly. Pick a divisor of {experts}.")
    if not getattr(config, "base_model_ep_plan", None):
        raise StageError(f"model.expert_parallel: transformers has no expert-parallel plan for model type "
                         f"{config.model_type!r} (its config has no base_model_ep_plan). Set expert_parallel: 1 and "
                         f"scale out with --accelerate zero3 or fsdp2.")


def load_kwargs(model: ModelConfig, config) -> dict:
    """Extra `from_pretrained` arguments: the distributed config when the experts are split, else none."""
    parallel = distributed_config(model)
    if parallel is None:
        return {}
    check_experts_divide(config, parallel.ep_size)
    return {"distributed_config": parallel}


def describe(model, size: int) -> str:
    """Which experts this process holds, e.g. `experts 0-3 of 8 in each of 2 MoE layers`."""
    from finetune.modeling import moe

    experts = [module for module in model.modules() if moe.is_experts(module)]
    total = experts[0].gate_up_proj.shape[0]
    local = total // size
    first = local * (int(os.environ.get("RANK", "0")) % size)
    return (f"experts {first}-{first + local - 1} of {total} in each of {len(experts)} MoE layers "
            f"(model.expert_parallel {size})")


def is_split(model) -> bool:
    """Whether `from_pretrained(distributed_config=...)` sharded this model (its weights are DTensors)."""
    return getattr(model, "is_distributed_loading_by_transformers", False)


def is_dtensor(tensor) -> bool:
    """Whether `tensor` is split across processes (a DTensor), without importing torch.distributed for whole ones."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole_tensor(tensor):
    """A DTensor gathered whole (a collective: every process calls it at the same point); other tensors as they are."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


@contextmanager
def hashable_weights(model):
    """While TRL's DPOTrainer is built: its model hash (the key of precomputed reference log-probs) reads each weight
    with `.numpy()`, which DTensors refuse ('.numpy() is not supported for tensor subclasses'). For a split model it
    hashes the gathered weights instead, the same digest on every process and as a single-process run's."""
    if not is_split(model):
        yield
        return
    import trl.trainer.dpo_trainer as dpo_trainer

    original = dpo_trainer.hash_module

    def hash_whole(module):
        digest = hashlib.sha256()
        for _, tensor in sorted(module.state_dict().items()):
            tensor = whole_tensor(tensor).detach().cpu()
            digest.update(str(tensor.dtype).encode())
            if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):  # as TRL's hash_module
                tensor = tensor.to(torch.float32)
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()

    dpo_trainer.hash_module = hash_whole
    try:
        yield
    finally:
        dpo_trainer.hash_module = original
