"""The DPO stage: preference optimisation with TRL's DPOTrainer, starting from the SFT result.

The reference policy is the SFT model. With LoRA, the SFT model is the base the adapter sits on, and TRL's
reference forward simply disables the adapter: no second copy of the model is loaded. Full fine-tuning with
reference log-probs computed every step needs a frozen second copy, loaded here explicitly (TRL would otherwise
reload `config._name_or_path`); under ZeRO-3 DPOTrainer shards that copy across the processes too (ZeRO-2 and DDP
keep a whole copy on every GPU). On a quantized base (QLoRA) the SFT adapter is never merged: DPO continues
training it, and TRL's reference is a frozen copy of it. The recipe's `speed:` section picks packed batches
(finetune/training/packed_dpo.py).
"""

from __future__ import annotations

from pathlib import Path

from finetune.training import balancing, routing_drift
from finetune.training.expert_load import expert_load_callbacks
from finetune.core import families

from finetune.modeling import expert_parallel, moe
from finetune.modeling.loading import load_stage_model, load_tokenizer, load_training_model, seed_everything
from finetune.training.packed_dpo import dpo_trainer
from finetune.config.parsing import dump_recipe
from finetune.config.recipe import Recipe
from finetune.core.rundir import Stage
from finetune.training.saving import save_stage
from finetune.training.data_splits import load_split, require_train_split
from finetune.training.trainer_config import checkpointing_the_model_runs, trainer_config
from finetune.training.resume import train_resuming


def stage_inputs(recipe: Recipe, needed: dict[str, dict]) -> dict:
    """What the output depends on: the model and dpo settings, the seed, the prepared data, the SFT result
    (`needed`: the manifests of the stages it needs, checked by the registry)."""
    return {"model": recipe.model_inputs("dpo"), "dpo": recipe.trainer_inputs("dpo"),
            "balancing": recipe.section_dict("balancing"), "seed": recipe.seed,
            "data": needed["prep"]["fingerprint"], "sft": needed["sft"]["fingerprint"]}


def run(recipe: Recipe, needed: dict[str, dict], force: bool | str = False) -> Path:
    stage = Stage(recipe.run_path, "dpo", inputs=stage_inputs(recipe, needed), progress=("checkpoint-*",))
    if not stage.begin(force):
        return stage.final

    seed_everything(recipe.seed)
    # The config first: under DeepSpeed ZeRO-3 it makes from_pretrained load each process's shard only.
    args = trainer_config(recipe.trainer_settings("dpo"), stage.work)
    tokenizer = load_tokenizer(recipe.model_source)
    model, peft_config, parent = load_training_model(recipe.model_source, "dpo", start="sft")
    checkpointing_the_model_runs(args, model, recipe.trainer_settings("dpo"))
    lora = recipe.model.lora_for("dpo")
    # Precomputed reference log-probs need no reference copy: TRL computes them with the model before training.
    needs_copy = not lora and not args.precompute_ref_log_probs
    with expert_parallel.hashable_weights(model):
        trainer = dpo_trainer(
            recipe.speed,
            model=model,
            ref_model=load_reference(recipe) if needs_copy else None,
            args=args,
            train_dataset=require_train_split(recipe.run_path / "data", "preference", "dpo"),
            eval_dataset=load_split(recipe.run_path / "data", "preference", "test"),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=expert_load_callbacks(model, stage.work, recipe.routing, "dpo"),
        )
    balancing.attach(trainer, model, recipe.balancing)
    routing_drift.attach(trainer, model, recipe.routing, "dpo", stage.work, recipe.seed)
    train_resuming(trainer, stage, recipe.checkpoints)
    if "ref" in getattr(trainer.model, "peft_config", {}):
        trainer.model.delete_adapter("ref")  # TRL's frozen copy of the SFT adapter (the reference); not an output
    return save_stage(trainer, tokenizer, dump_recipe(recipe), stage, parent=parent)


def load_reference(recipe: Recipe):
    """The frozen SFT model for full fine-tuning. DPOTrainer shards it like the policy under ZeRO-3 and FSDP."""
    reference = load_stage_model(recipe.model_source, "sft").eval()
    families.prepare_for_training(reference)
    moe.mark_moe_blocks_as_zero3_leaves(reference)
    return reference
