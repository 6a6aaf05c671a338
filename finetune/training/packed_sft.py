"""TRL's SFTTrainer on padding-free batches and with the LM head on the scored tokens only: the same examples per
step and the same loss.

TRL's `padding_free` lays a batch's sequences end to end in one row with restarting position ids, but refuses it
without packing while `max_length` is set. Here TRL prepares (truncates, filters) the dataset exactly as for padded
batches, then its collator is switched to padding-free: the batches are the padded ones minus the padding.

With sdpa, transformers builds a dense mask over the whole padding-free row, so attention would cost the square of
the batch's total length; block attention (finetune/training/packed_forward.py) runs it sequence by sequence instead. The LM
head runs on the assistant tokens only (finetune/training/scored_lm_head.py).
"""

from __future__ import annotations

from peft import PeftModel
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from finetune.training.packed_forward import padding_free_for, use_block_attention
from finetune.training.scored_lm_head import install_scored_lm_head
from finetune.training.saving import CheckpointLayoutSaves
from finetune.training.split_checkpoints import SplitModelCheckpoints

SFT_FIELDS = ("log_probs", "entropy", "is_top1")  # TRL's SFT loss and its entropy and token-accuracy metrics


class CheckpointingSFTTrainer(SplitModelCheckpoints, CheckpointLayoutSaves, SFTTrainer):
    """TRL's SFTTrainer, with checkpoints that also work when the experts are split (model.expert_parallel) and
    weights saved in the checkpoint's layout."""


class PaddingFreeSFTTrainer(CheckpointingSFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.data_collator, DataCollatorForLanguageModeling):
            raise ValueError("speed.padding_free works with TRL's own SFT collator (text conversations); "
                             "set speed.padding_free: false.")
        self.padding_free = self.data_collator.padding_free = True
        use_block_attention(unwrapped(self.model))


def unwrapped(model):
    """The *ForCausalLM under a PEFT wrapper, whose forward TRL patched."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def sft_trainer(speed, **kwargs) -> SFTTrainer:
    """The SFT trainer the recipe's `speed:` section asks for (same loss either way)."""
    trainer = PaddingFreeSFTTrainer(**kwargs) if padding_free_for(speed, kwargs["model"], "sft") \
        else CheckpointingSFTTrainer(**kwargs)
    if speed.scored_lm_head:
        install_scored_lm_head(unwrapped(trainer.model), SFT_FIELDS, speed.tiled_lm_head)
    return trainer
