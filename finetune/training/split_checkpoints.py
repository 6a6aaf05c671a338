"""Checkpoints of a model whose experts are split across processes (model.expert_parallel): each process's optimizer
shard saved and restored with torch.distributed.checkpoint, the weights gathered whole.

transformers 5.24's Trainer refuses to checkpoint optimizer state for a model sharded at load time ("Resuming is not
supported for models sharded at load time", trainer.py) and would otherwise write only the main process's shards
with torch.save. Here every process writes its own shards of the Adam moments (DTensors) into the checkpoint's
`optimizer_shards/` folder and reads them back on resume; the weights are the gathered safetensors file that
save_pretrained writes, put back into the split model with `set_model_state_dict` (or the adapter, whole on every
process, which Trainer loads as usual, each process keeping its part of the experts' factors:
split_expert_lora.py).
"""

from __future__ import annotations

import os
import torch
from transformers.trainer import ADAPTER_SAFE_WEIGHTS_NAME, SCHEDULER_NAME

from finetune.modeling import expert_parallel, split_expert_lora

OPTIMIZER_SHARDS = "optimizer_shards"  # the name holds "optimizer", which Trainer's resume takes as optimizer state


def torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def checkpoint_layout(state):
    """The optimizer state as torch.distributed.checkpoint writes and reads it: the moments of lora_B factors split
    with their experts (_StridedShard, which it places wrongly: 'overlapping chunks') seen as (out, r, E) cut
    along E, a view of the same memory, so reading fills the optimizer's own tensors."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(state, dict):
        return {key: checkpoint_layout(value) for key, value in state.items()}
    # only a factor's 1-D layout on the experts' `ep` mesh: FSDP2's own strided shards of split experts (full
    # fine-tuning: efsdp then ep) are read and written right
    if not isinstance(state, DTensor) or len(state.placements) != 1 \
            or not isinstance(state.placements[0], _StridedShard):
        return state
    (placement,) = state.placements
    dim, runs = placement.dim, placement.split_factor
    shape = (*state.shape[:dim], runs, state.shape[dim] // runs, *state.shape[dim + 1:])
    local = state.to_local().unflatten(dim, (runs, -1))
    return DTensor.from_local(local, state.device_mesh, [Shard(dim + 1)], shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


class SplitModelCheckpoints:
    """Trainer mixin: optimizer and scheduler state of a split model saved and loaded by every process, and the
    gradients of LoRA factors split with their experts averaged over the processes' batches."""

    def _sync_replicated_trainable_parameters(self, model) -> None:
        super()._sync_replicated_trainable_parameters(model)  # the replicated adapters: broadcast, averaged
        if split_expert_lora.average_factor_gradients(model, lambda: self.accelerator.sync_gradients):
            held, whole = split_expert_lora.held_factor_elements(model)
            print(f"process {os.environ.get('RANK', '0')} holds {held} of the {whole} elements of the routed "
                  f"experts' LoRA factors", flush=True)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not expert_parallel.is_split(self.model):
            return super()._save_optimizer_and_scheduler(output_dir)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, torch_optimizer(self.optimizer))
        # a collective: every process writes its parts
        dcp.save(checkpoint_layout(state), checkpoint_id=os.path.join(output_dir, OPTIMIZER_SHARDS))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """The checkpoint's gathered weights, read in the fused expert layout by from_pretrained (Trainer's raw
        load_state_dict would copy plain tensors into DTensors, which they refuse), each process keeping its shards.
        An adapter checkpoint loads as usual (PEFT's load_adapter): the whole factors of split experts are cut to
        each process's part as they load (split_expert_lora.part_of_loaded)."""
        adapter = os.path.isfile(os.path.join(resume_from_checkpoint, ADAPTER_SAFE_WEIGHTS_NAME))
        if not expert_parallel.is_split(self.model) or adapter:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        saved = type(self.model).from_pretrained(resume_from_checkpoint, dtype=self.model.dtype).state_dict()
        set_model_state_dict(self.model, saved, options=StateDictOptions(full_state_dict=True))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is None or not expert_parallel.is_split(self.model):
            return super()._load_optimizer_and_scheduler(checkpoint)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        optimizer = torch_optimizer(self.optimizer)
        state = get_optimizer_state_dict(self.model, optimizer)  # the layout to read into (moments initialised)
        dcp.load(checkpoint_layout(state), checkpoint_id=os.path.join(checkpoint, OPTIMIZER_SHARDS))
        set_optimizer_state_dict(self.model, optimizer, state)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))


