"""What SFT and DPO share: TRL configs with device-aware defaults, the datasets, and saving a stage's output."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from datasets import load_dataset
from transformers import TrainerCallback

from finetune import adapters, distributed, expert_quant
from finetune.checkpoints import SaveEveryMinutes, SealCheckpoints, checkpoints, newest_usable_checkpoint
from finetune.hub import push_stage_if_configured
from finetune.models import load_quantized, load_stage_model, resolve_dtype
from finetune.moe import ExpertLoadCallback, is_moe_model
from finetune.recipe import CheckpointConfig, Recipe, dump_recipe, trainer_config_class
from finetune.stage import Stage, StageError, require_complete


def device_defaults(recipe: Recipe) -> dict[str, Any]:
    """Defaults that depend on the machine: TRL's (bf16 on, checkpointing on) fail or crawl on a CPU."""
    on_gpu = torch.cuda.is_available()
    weights = resolve_dtype(recipe.model.dtype)
    return {
        "use_cpu": not on_gpu,
        "bf16": on_gpu and weights == torch.bfloat16,
        "fp16": on_gpu and weights == torch.float16,
        # Activation checkpointing saves GPU memory; on a CPU it only costs time.
        "gradient_checkpointing": on_gpu,
    }


def moetune_defaults(stage: str, recipe: Recipe) -> dict[str, Any]:
    """The TRL fields moetune sets unless the recipe does (what `moetune sft --trl-fields` shows as defaults)."""
    values: dict[str, Any] = {
        "report_to": "none",
        "logging_steps": 10,
        # No step schedule: checkpoints come every `checkpoints.every_minutes` and on SIGTERM/Ctrl-C (train_resuming).
        "save_strategy": "no",
        "save_total_limit": 2,  # of either kind: enough to fall back on when the newest was cut short
        "data_seed": recipe.seed,
        **device_defaults(recipe),
    }
    if stage == "sft":
        values["assistant_only_loss"] = True
    if stage == "dpo":
        values["precompute_ref_log_probs"] = recipe.speed.reference_cache
    return values


def trainer_config(stage: str, recipe: Recipe, output_dir: Path):
    """TRL's SFTConfig/DPOConfig: moetune's defaults, then every field the recipe sets (the recipe wins)."""
    values = {**moetune_defaults(stage, recipe), **getattr(recipe, stage)}
    values.update(output_dir=str(output_dir), seed=recipe.seed)
    return trainer_config_class(stage)(**values)


def load_training_model(recipe: Recipe, stage: str, start: str):
    """(model, peft_config, parent): what a stage trains, the adapter to add (None: it trains all weights, or
    continues an adapter), and the stage its output sits on.

    In full precision a stage starts from `start` with its adapters merged in and adds a fresh adapter. A quantized
    base (QLoRA) is never merged into: when `start` is an adapter, training continues it on its quantized base (for
    DPO, TRL keeps a frozen copy of it as the reference policy) and the new adapter sits on that base too. Under
    ZeRO-3 the MoE blocks are marked as leaf modules.
    """
    model, peft_config, parent = load_model_and_adapter(recipe, stage, start)
    distributed.mark_moe_blocks_as_zero3_leaves(model)
    return model, peft_config, parent


def load_model_and_adapter(recipe: Recipe, stage: str, start: str):
    lora = recipe.model.lora_for(stage)
    if lora is None or recipe.model.quantization is None:
        model = load_stage_model(recipe, start)
        return model, adapters.peft_config(model, lora) if lora else None, start
    outputs = require_complete(recipe.run_path, start, needed_by=stage)["outputs"] if start != "base" else {}
    if outputs.get("kind") != "adapter":
        model = load_quantized(recipe, start)
        return model, adapters.peft_config(model, lora), start
    parent = outputs["parent"]
    base = load_quantized(recipe, parent)
    return expert_quant.load_adapter(base, str(recipe.run_path / start), trainable=True), None, parent


def load_split(recipe: Recipe, kind: str, split: str):
    """A prepared split (`run_dir/data/<kind>/<split>.jsonl`), or None when it is absent or empty."""
    path = recipe.run_path / "data" / kind / f"{split}.jsonl"
    if not path.is_file() or path.stat().st_size == 0:
        return None
    return load_dataset("json", data_files=str(path), split="train")


def require_train_split(recipe: Recipe, kind: str, stage: str):
    train = load_split(recipe, kind, "train")
    if train is None:
        raise ValueError(f"[{stage}] {recipe.run_path}/data/{kind}/train.jsonl is empty: the recipe's data has no "
                         f"{'SFT conversations' if kind == 'sft' else 'preference pairs'}. Add a source that makes them.")
    return train


def expert_load_callbacks(model, stage: Stage) -> list:
    return [ExpertLoadCallback(model, stage.work / "expert_load.json")] if is_moe_model(model) else []


class StopOnSignal(TrainerCallback):
    """On SIGTERM/Ctrl-C, finish the current step, save a checkpoint and stop, so a re-run can resume from it."""

    def __init__(self):
        self.requested = False

    def request(self, signum, frame) -> None:
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


def train_resuming(trainer, stage: Stage, schedule: CheckpointConfig) -> None:
    """Train from the newest usable checkpoint in the work folder, if any, saving checkpoints on the recipe's
    schedule; stop cleanly on SIGTERM or Ctrl-C."""
    with distributed.main_process_first():  # the main process removes unusable checkpoints before the others look
        newest = newest_usable_checkpoint(stage.work, stage.name, main_process=distributed.is_main_process())
    if newest is not None:
        if distributed.is_main_process():
            print(f"[{stage.name}] resuming from {newest[1]} (step {newest[0]})")
        restore_full_weights(trainer, newest[1])
    if distributed.is_main_process():
        print(f"[{stage.name}] {describe_global_batch(trainer.args)}", flush=True)
    distributed.warn_if_fsdp_without_gpus()
    stopper = StopOnSignal()
    # moetune keeps the last save_total_limit checkpoints itself, once the new one is sealed (see checkpoints.py).
    keep, trainer.args.save_total_limit = trainer.args.save_total_limit, None
    callbacks = [SealCheckpoints(stage.work, keep), stopper]
    if schedule.every_minutes:
        callbacks.append(SaveEveryMinutes(schedule.every_minutes))
    for callback in callbacks:
        trainer.add_callback(callback)
    previous = {signum: signal.signal(signum, stopper.request) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        trainer.train(resume_from_checkpoint=str(newest[1]) if newest else None)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for callback in callbacks:
            trainer.remove_callback(callback)
    if stopper.requested:
        raise StageError(f"[{stage.name}] interrupted at step {trainer.state.global_step}; checkpoint saved in "
                         f"{stage.work}. Run the same command again to resume from it.")


def restore_full_weights(trainer, checkpoint: Path) -> None:
    """Load a full-model checkpoint's weights through from_pretrained before Trainer resumes.

    transformers saves MoE experts in the per-expert layout of the Hub checkpoints, but Trainer's resume loads the
    file as a raw, non-strict state dict: the fused expert and router weights would silently keep their start values.
    from_pretrained converts the layout. Adapter checkpoints are loaded by PEFT and need none of this.
    """
    if (checkpoint / "adapter_config.json").is_file() or trainer.is_deepspeed_enabled:
        return  # DeepSpeed restores the weights from its own files (global_step<N>/), in the model's layout
    saved = type(trainer.model).from_pretrained(str(checkpoint), dtype=trainer.model.dtype)
    trainer.model.load_state_dict(saved.state_dict())


def remove_checkpoints(stage: Stage) -> None:
    """The committed output holds the final weights; checkpoints (with optimizer state) were only for resuming."""
    for _, path in checkpoints(stage.work):
        shutil.rmtree(path)


def save_stage(trainer, tokenizer, recipe: Recipe, stage: Stage, parent: str) -> Path:
    """Write weights or adapter, tokenizer, resolved recipe and metrics; then commit the stage.

    Every process calls this: saving gathers ZeRO-3/FSDP shards from all of them, and Trainer writes the weights
    from the main process only. The other files, the summary and the push are the main process's alone.
    """
    distributed.check_replicas_agree(trainer.model, stage.name)
    main = distributed.is_main_process()
    if main:
        remove_checkpoints(stage)
    trainer.save_model(str(stage.work))
    summary = write_stage_files(trainer, tokenizer, recipe, stage, parent) if main else {}
    final = stage.commit(summary)
    if main:
        print_summary(stage.name, summary, final, trainer.state.log_history)
        push_stage_if_configured(recipe, final)
    return final


def write_stage_files(trainer, tokenizer, recipe: Recipe, stage: Stage, parent: str) -> dict:
    """Tokenizer, resolved recipe and metrics next to the weights; returns the manifest's summary."""
    tokenizer.save_pretrained(str(stage.work))
    (stage.work / "recipe.yaml").write_text(dump_recipe(recipe))
    history = trainer.state.log_history
    (stage.work / "metrics.json").write_text(json.dumps(history, indent=1))
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return {
        "kind": "adapter" if (stage.work / "adapter_config.json").is_file() else "full",
        "parent": parent,
        "steps": trainer.state.global_step,
        "processes": trainer.args.world_size,
        "global_batch": global_batch(trainer.args),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "runtime_s": next((e["train_runtime"] for e in history if "train_runtime" in e), None),
    }


def global_batch(args) -> int:
    """Sequences (SFT) or preference pairs (DPO) per optimizer step, over every process."""
    return args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps


def describe_global_batch(args) -> str:
    return (f"global batch {global_batch(args)} = {args.per_device_train_batch_size} per device x "
            f"{args.world_size} process{'es' if args.world_size > 1 else ''} x "
            f"{args.gradient_accumulation_steps} accumulation step{'s' if args.gradient_accumulation_steps > 1 else ''}")


def print_summary(name: str, summary: dict, folder: Path, history: list[dict]) -> None:
    cv = [entry["expert_load_cv_mean"] for entry in history if "expert_load_cv_mean" in entry]
    aux = [entry["aux_loss"] for entry in history if "aux_loss" in entry]
    print(f"[{name}] {summary['steps']} steps in {summary['runtime_s'] or 0:.0f}s; "
          f"loss {summary['first_loss']} -> {summary['last_loss']}"
          + (f"; router aux loss {aux[-1]:.4f}" if aux else "")
          + (f"; expert-load CV {cv[-1]:.3f}" if cv else "")
          + f". Saved {summary['kind']} to {folder}")
