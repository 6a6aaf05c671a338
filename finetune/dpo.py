"""The DPO stage: preference optimisation with TRL's DPOTrainer, starting from the SFT result.

The reference policy is the SFT model. With LoRA, the SFT model is the base the adapter sits on, and TRL's
reference forward simply disables the adapter: no second copy of the model is loaded. Full fine-tuning with
reference log-probs computed every step needs a frozen second copy, loaded here explicitly (TRL would otherwise
reload `config._name_or_path`). The recipe's `speed:` section picks packed batches (finetune/packed_dpo.py).
"""

from __future__ import annotations

from pathlib import Path

from finetune import adapters
from finetune.models import load_stage_model, load_tokenizer, seed_everything
from finetune.packed_dpo import dpo_trainer
from finetune.recipe import Recipe
from finetune.stage import Stage, require_complete
from finetune.training import (expert_load_callbacks, load_split, require_train_split, save_stage, trainer_config,
                               train_resuming)


def run(recipe: Recipe, force: bool = False) -> Path:
    data = require_complete(recipe.run_path, "data", needed_by="dpo")
    sft = require_complete(recipe.run_path, "sft", needed_by="dpo")
    stage = Stage(recipe.run_path, "dpo", inputs={
        "model": recipe.model_inputs("dpo"), "dpo": recipe.dpo, "seed": recipe.seed,
        "data": data["fingerprint"], "sft": sft["fingerprint"],
    })
    if not stage.begin(force):
        return stage.final

    seed_everything(recipe.seed)
    tokenizer = load_tokenizer(recipe)
    model = load_stage_model(recipe, "sft")
    lora = recipe.model.lora_for("dpo")
    config = trainer_config("dpo", recipe, stage.work)
    # Precomputed reference log-probs need no reference copy: TRL computes them with the model before training.
    needs_copy = not lora and not config.precompute_ref_log_probs
    trainer = dpo_trainer(
        recipe.speed,
        model=model,
        ref_model=load_stage_model(recipe, "sft").eval() if needs_copy else None,
        args=config,
        train_dataset=require_train_split(recipe, "preference", "dpo"),
        eval_dataset=load_split(recipe, "preference", "test"),
        processing_class=tokenizer,
        peft_config=adapters.peft_config(model, lora) if lora else None,
        callbacks=expert_load_callbacks(model, stage),
    )
    train_resuming(trainer, stage)
    return save_stage(trainer, tokenizer, recipe, stage, parent="sft")
