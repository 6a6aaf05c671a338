"""The SFT stage: supervised fine-tuning on conversations with TRL's SFTTrainer (loss on assistant turns only)."""

from __future__ import annotations

from pathlib import Path

from finetune import balancing
from finetune.chat_template import training_template_problem
from finetune.models import base_location, build_base, load_tokenizer, seed_everything
from finetune.packed_sft import sft_trainer
from finetune.recipe import Recipe
from finetune.stage import Stage, require_complete
from finetune.training import (ASSISTANT_ONLY_LOSS, expert_load_callbacks, load_split, load_training_model,
                               require_train_split, save_stage, trainer_config, train_resuming)


def run(recipe: Recipe, force: bool = False) -> Path:
    data = require_complete(recipe.run_path, "data", needed_by="sft")
    if recipe.model.init is not None:
        build_base(recipe)
    # A tokenizer or template that cannot work fails here, before the stage leaves a partial folder behind.
    tokenizer = load_tokenizer(recipe)
    check_template_for_loss(recipe, tokenizer)
    stage = Stage(recipe.run_path, "sft", inputs={
        "model": recipe.model_inputs("sft"), "sft": recipe.sft, "balancing": recipe.section_dict("balancing"),
        "seed": recipe.seed, "data": data["fingerprint"],
    })
    if not stage.begin(force):
        return stage.final

    seed_everything(recipe.seed)
    # The config first: under DeepSpeed ZeRO-3 it makes from_pretrained load each process's shard only.
    args = trainer_config("sft", recipe, stage.work)
    model, peft_config, parent = load_training_model(recipe, "sft", start="base")
    trainer = sft_trainer(
        recipe.speed,
        model=model,
        args=args,
        train_dataset=require_train_split(recipe, "sft", "sft"),
        eval_dataset=load_split(recipe, "sft", "test"),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=expert_load_callbacks(model, stage),
    )
    balancing.attach(trainer, model, recipe.balancing)
    train_resuming(trainer, stage, recipe.checkpoints)
    return save_stage(trainer, tokenizer, recipe, stage, parent=parent)


def check_template_for_loss(recipe: Recipe, tokenizer) -> None:
    """Refuse, before training, a template that assistant-only loss cannot use (TRL would fail at its first batch)."""
    if not recipe.sft.get("assistant_only_loss", ASSISTANT_ONLY_LOSS):
        return
    where = "model.chat_template" if recipe.model.chat_template is not None else base_location(recipe)
    problem = training_template_problem(tokenizer, where)
    if problem is not None:
        raise ValueError(f"[sft] {problem}")
