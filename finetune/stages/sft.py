"""The SFT stage: supervised fine-tuning on conversations with TRL's SFTTrainer (loss on assistant turns only)."""

from __future__ import annotations

from pathlib import Path

from finetune.training import balancing, routing_drift
from finetune.config.chat_template import HOW, TURN_BY_TURN, assistant_token_source
from finetune.core import distributed
from finetune.modeling.loading import base_location, load_tokenizer, load_training_model, seed_everything
from finetune.training.expert_load import expert_load_callbacks
from finetune.training.packed_sft import sft_trainer
from finetune.config.parsing import dump_recipe
from finetune.config.recipe import Recipe
from finetune.training.assistant_masks import NotPrefixStable, tokenized_with_masks
from finetune.training.reply_truncation import PREP_SAMPLE, no_replies_left_message, reply_starts
from finetune.core.rundir import Stage
from finetune.training.saving import save_stage
from finetune.training.data_splits import load_split, require_train_split
from finetune.training.trainer_config import ASSISTANT_ONLY_LOSS, checkpointing_the_model_runs, trainer_config
from finetune.training.resume import train_resuming


def stage_inputs(recipe: Recipe, needed: dict[str, dict]) -> dict:
    """What the output depends on: the model and sft settings, the seed, the prepared data (`needed`: the manifests
    of the stages it needs, checked by the registry)."""
    return {"model": recipe.model_inputs("sft"), "sft": recipe.trainer_inputs("sft"),
            "balancing": recipe.section_dict("balancing"), "seed": recipe.seed,
            "data": needed["prep"]["fingerprint"]}


def run(recipe: Recipe, needed: dict[str, dict], force: bool | str = False) -> Path:
    # A tokenizer or template that cannot work fails here, before the stage leaves a partial folder behind.
    tokenizer = load_tokenizer(recipe.model_source)
    conversations = require_train_split(recipe.run_path / "data", "sft", "sft")
    train_dataset, eval_dataset, source = datasets_for_loss(recipe, tokenizer, conversations)
    stage = Stage(recipe.run_path, "sft", inputs=stage_inputs(recipe, needed), progress=("checkpoint-*",))
    if not stage.begin(force):
        return stage.final

    seed_everything(recipe.seed)
    # The config first: under DeepSpeed ZeRO-3 it makes from_pretrained load each process's shard only.
    args = trainer_config(recipe.trainer_settings("sft"), stage.work)
    if source == TURN_BY_TURN:
        args.assistant_only_loss = False  # the rows carry their assistant_masks, which TRL's labels read as they are
    model, peft_config, parent = load_training_model(recipe.model_source, "sft", start="base")
    checkpointing_the_model_runs(args, model, recipe.trainer_settings("sft"))
    trainer = sft_trainer(
        recipe.speed,
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=expert_load_callbacks(model, stage.work, recipe.routing, "sft"),
    )
    check_replies_left(trainer, tokenizer, conversations)
    balancing.attach(trainer, model, recipe.balancing)
    routing_drift.attach(trainer, model, recipe.routing, "sft", stage.work, recipe.seed)
    train_resuming(trainer, stage, recipe.checkpoints)
    return save_stage(trainer, tokenizer, dump_recipe(recipe), stage, parent=parent)


def datasets_for_loss(recipe: Recipe, tokenizer, conversations):
    """(train, eval, how the assistant's tokens are found) for SFT; says in one line which way it uses.

    With a plain template the conversations are tokenized here, each with its assistant mask found turn by turn; a
    template that renders earlier turns differently once later ones follow is refused with the ways out."""
    test = load_split(recipe.run_path / "data", "sft", "test")
    if not recipe.sft.get("assistant_only_loss", ASSISTANT_ONLY_LOSS):
        return conversations, test, None
    source = assistant_token_source(tokenizer)
    if distributed.is_main_process():
        print(f"[sft] assistant-only loss: {HOW[source]}")
    if source != TURN_BY_TURN:
        return conversations, test, source
    try:
        masked = [tokenized_with_masks(tokenizer, split) if split is not None else None for split in (conversations, test)]
    except NotPrefixStable as error:
        where = "model.chat_template" if recipe.model.chat_template is not None else base_location(recipe.model_source)
        raise ValueError(f"[sft] the chat template of {where} has no {{% generation %}} markers, and its assistant "
                         f"tokens cannot be found turn by turn: {error}. Wrap each assistant reply (and its "
                         f"end-of-turn token) in {{% generation %}}...{{% endgeneration %}} in model.chat_template, "
                         f"or set sft.assistant_only_loss: false to train on whole conversations.") from None
    return masked[0], masked[1], source


def check_replies_left(trainer, tokenizer, conversations) -> None:
    """Stop with the reason, instead of torch's "num_samples=0", when truncation left no example an assistant token."""
    if len(trainer.train_dataset) == 0:
        starts = reply_starts(tokenizer, conversations.select(range(min(PREP_SAMPLE, len(conversations))))["messages"])
        raise ValueError(no_replies_left_message(trainer.args.max_length, starts))
