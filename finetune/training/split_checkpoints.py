"""Checkpoints of a model whose experts are split across processes (model.expert_parallel): each process's optimizer
shard saved and restored with torch.distributed.checkpoint, the weights gathered whole.

transformers 5.24's Trainer refuses to checkpoint optimizer state for a model sharded at load time ("Resuming is not
supported for models sharded at load time", trainer.py) and would otherwise write only the main process's shards
with torch.save. Here every process writes its own shards of the Adam moments (DTensors) into the checkpoint's
`optimizer_shards/` folder and reads them back on resume; the weights are the gathered safetensors file that
save_pretrained writes, put back into the split model with `set_model_state_dict` (or the adapter, whole on every
process, which Trainer loads as usual).
"""

from __future__ import annotations

import os
import torch
from transformers.trainer import ADAPTER_SAFE_WEIGHTS_NAME, SCHEDULER_NAME

from finetune.modeling import expert_parallel

OPTIMIZER_SHARDS = "optimizer_shards"  # the name holds "optimizer", which Trainer's resume takes as optimizer state


def torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


class SplitModelCheckpoints:
    """Trainer mixin: optimizer and scheduler state of a split model saved and loaded by every process."""

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not expert_parallel.is_split(self.model):
            return super()._save_optimizer_and_scheduler(output_dir)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, torch_optimizer(self.optimizer))
        dcp.save(state, checkpoint_id=os.path.join(output_dir, OPTIMIZER_SHARDS))  # collective: every process
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """The checkpoint's gathered weights, read in the fused expert layout by from_pretrained (Trainer's raw
        load_state_dict would copy plain tensors into DTensors, which they refuse), each process keeping its shards.
        An adapter checkpoint loads as usual: the adapters are plain tensors, whole on every process."""
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
        dcp.load(state, checkpoint_id=os.path.join(checkpoint, OPTIMIZER_SHARDS))
        set_optimizer_state_dict(self.model, optimizer, state)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))


