"""The SFT stage: supervised fine-tuning on conversations with TRL's SFTTrainer (loss on assistant turns only)."""

from __future__ import annotations

from pathlib import Path

from finetune.training import balancing, routing_drift
from finetune.config.chat_template import training_template_problem
from finetune.modeling.loading import base_location, load_tokenizer, load_training_model, seed_everything
from finetune.training.expert_load import expert_load_callbacks
from finetune.training.packed_sft import sft_trainer
from finetune.config.recipe import Recipe
from finetune.core.rundir import Stage, require_complete
from finetune.training.saving import save_stage
from finetune.training.data_splits import load_split, require_train_split
from finetune.training.trainer_config import ASSISTANT_ONLY_LOSS, trainer_config
from finetune.training.resume import train_resuming


def stage_inputs(recipe: Recipe) -> dict:
    """What the output depends on: the model and sft settings, the seed, the prepared data."""
    data = require_complete(recipe.run_path, "data", needed_by="sft")
    return {"model": recipe.model_inputs("sft"), "sft": recipe.trainer_inputs("sft"),
            "balancing": recipe.section_dict("balancing"), "seed": recipe.seed, "data": data["fingerprint"]}


def run(recipe: Recipe, force: bool | str = False) -> Path:
    # A tokenizer or template that cannot work fails here, before the stage leaves a partial folder behind.
    tokenizer = load_tokenizer(recipe)
    check_template_for_loss(recipe, tokenizer)
    stage = Stage(recipe.run_path, "sft", inputs=stage_inputs(recipe), progress=("checkpoint-*",))
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
        callbacks=expert_load_callbacks(model, stage.work, recipe.routing, "sft"),
    )
    balancing.attach(trainer, model, recipe.balancing)
    routing_drift.attach(trainer, model, recipe.routing, "sft", stage.work, recipe.seed)
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
