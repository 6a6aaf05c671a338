"""The SFT stage: supervised fine-tuning on conversations with TRL's SFTTrainer (loss on assistant turns only)."""

from __future__ import annotations

from pathlib import Path

from finetune.models import load_tokenizer, load_training_model, seed_everything
from finetune.moe import expert_load_callbacks
from finetune.packed_sft import sft_trainer
from finetune.recipe import Recipe
from finetune.rundir import Stage, require_complete
from finetune.saving import save_stage
from finetune.splits import load_split, require_train_split
from finetune.trainer_config import trainer_config
from finetune.training import train_resuming


def run(recipe: Recipe, force: bool = False) -> Path:
    data = require_complete(recipe.run_path, "data", needed_by="sft")
    stage = Stage(recipe.run_path, "sft", inputs={
        "model": recipe.model_inputs("sft"), "sft": recipe.trainer_inputs("sft"), "seed": recipe.seed, "data": data["fingerprint"],
    }, progress=("checkpoint-*",))
    if not stage.begin(force):
        return stage.final

    seed_everything(recipe.seed)
    # The config first: under DeepSpeed ZeRO-3 it makes from_pretrained load each process's shard only.
    args = trainer_config("sft", recipe, stage.work)
    tokenizer = load_tokenizer(recipe)
    model, peft_config, parent = load_training_model(recipe, "sft", start="base")
    trainer = sft_trainer(
        recipe.speed,
        model=model,
        args=args,
        train_dataset=require_train_split(recipe, "sft", "sft"),
        eval_dataset=load_split(recipe, "sft", "test"),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=expert_load_callbacks(model, stage.work),
    )
    train_resuming(trainer, stage, recipe.checkpoints)
    return save_stage(trainer, tokenizer, recipe, stage, parent=parent)
