"""TRL's DPOTrainer on packed batches: the same loss code and metrics, on fewer tokens.

The batches come from `PackedPreferenceCollator` (padding-free, optionally prompt-shared) and the model is patched
by `install_packed_forward` to run them and answer in TRL's padded layout. Everything else is TRL's, including
`precompute_ref_log_probs` (the reference log-probs computed once in an inference pass, on packed batches too,
and cached as finetune/training/reference_cache.py keys them).
"""

from __future__ import annotations

from peft import PeftModel
from trl import DPOTrainer

from finetune.training.packed_forward import install_packed_forward, log_probs_only, padding_free_for
from finetune.training.preference_packing import PackedPreferenceCollator
from finetune.training.reference_cache import ReferenceCachedDPOTrainer


class PackedDPOTrainer(ReferenceCachedDPOTrainer):
    def __init__(self, *args, share_prompt: bool = True, tiled_lm_head: bool = True, **kwargs):
        config, tokenizer = kwargs["args"], kwargs["processing_class"]
        kwargs["data_collator"] = PackedPreferenceCollator(
            pad_token_id=tokenizer.pad_token_id, max_length=config.max_length,
            truncation_mode=config.truncation_mode, share_prompt=share_prompt,
        )
        self.tiled_lm_head = tiled_lm_head  # read by install_packed_forward, which TRL's __init__ may call first
        super().__init__(*args, **kwargs)
        self.install_packed_forward()

    def install_packed_forward(self) -> None:
        """Once, after TRL added its fused LM head (in its __init__) and before the first packed batch."""
        if getattr(self, "packed_forward_installed", False):
            return
        policy = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        fields = ("log_probs", "entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if self.use_weighting else ())
        install_packed_forward(policy, fields, self.tiled_lm_head)
        if self.ref_model is not None:
            install_packed_forward(self.accelerator.unwrap_model(self.ref_model), tiled=self.tiled_lm_head)
        self.packed_forward_installed = True

    def compute_ref_log_probs(self, model, inputs):
        with log_probs_only():  # TRL reads the reference's log-probs only: no entropy, top-1 or mean logits
            return super().compute_ref_log_probs(model, inputs)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL runs this inside its own __init__, before our __init__ can patch the model.
        self.install_packed_forward()
        return super()._precompute_ref_logps(dataset, name, batch_size)


def dpo_trainer(speed, **kwargs) -> DPOTrainer:
    """The DPO trainer the recipe's `speed:` section asks for (same loss either way)."""
    if padding_free_for(speed, kwargs["model"], "dpo"):
        return PackedDPOTrainer(share_prompt=speed.share_prompt, tiled_lm_head=speed.tiled_lm_head, **kwargs)
    return ReferenceCachedDPOTrainer(**kwargs)
