"""What SFT and DPO share: TRL configs with device-aware defaults, the datasets, and saving a stage's output."""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from datasets import load_dataset
from transformers import TrainerCallback

from finetune.hub import push_stage_if_configured
from finetune.models import resolve_dtype
from finetune.moe import ExpertLoadCallback, is_moe_model
from finetune.recipe import Recipe, dump_recipe, trainer_config_class
from finetune.stage import Stage, StageError


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


def trainer_config(stage: str, recipe: Recipe, output_dir: Path):
    """TRL's SFTConfig/DPOConfig: moetune's defaults, then every field the recipe sets (the recipe wins)."""
    values: dict[str, Any] = {
        "report_to": "none",
        "logging_steps": 10,
        "save_strategy": "no",
        "data_seed": recipe.seed,
        **device_defaults(recipe),
    }
    if stage == "sft":
        values["assistant_only_loss"] = True
    if stage == "dpo":
        values["precompute_ref_log_probs"] = recipe.speed.reference_cache
    values.update(getattr(recipe, stage))
    values.update(output_dir=str(output_dir), seed=recipe.seed)
    return trainer_config_class(stage)(**values)


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


# Trainer names its checkpoints `checkpoint-<global step>` inside output_dir (the stage's work folder).
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin",
           "adapter_model.bin")


def checkpoints(work: Path) -> list[tuple[int, Path]]:
    """The Trainer checkpoints in a work folder, newest (highest step) first."""
    found = [(int(match.group(1)), path) for path in work.iterdir()
             if path.is_dir() and (match := CHECKPOINT.fullmatch(path.name))]
    return sorted(found, reverse=True)


def is_complete(checkpoint: Path) -> bool:
    """Trainer writes weights, optimizer and trainer_state.json in turn; a kill in between leaves a partial one."""
    has_weights = any((checkpoint / name).is_file() for name in WEIGHTS)
    return has_weights and (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()


def newest_complete_checkpoint(stage: Stage) -> tuple[int, Path] | None:
    for step, path in checkpoints(stage.work):
        if is_complete(path):
            return step, path
        print(f"[{stage.name}] {path} is incomplete (interrupted while saving): falling back to the previous checkpoint.")
    return None


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


def train_resuming(trainer, stage: Stage) -> None:
    """Train from the newest complete checkpoint in the work folder, if any; stop cleanly on SIGTERM or Ctrl-C."""
    newest = newest_complete_checkpoint(stage)
    if newest is not None:
        print(f"[{stage.name}] resuming from {newest[1]} (step {newest[0]})")
        restore_full_weights(trainer, newest[1])
    stopper = StopOnSignal()
    trainer.add_callback(stopper)
    previous = {signum: signal.signal(signum, stopper.request) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        trainer.train(resume_from_checkpoint=str(newest[1]) if newest else None)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        trainer.remove_callback(stopper)
    if stopper.requested:
        raise StageError(f"[{stage.name}] interrupted at step {trainer.state.global_step}; checkpoint saved in "
                         f"{stage.work}. Run the same command again to resume from it.")


def restore_full_weights(trainer, checkpoint: Path) -> None:
    """Load a full-model checkpoint's weights through from_pretrained before Trainer resumes.

    transformers saves MoE experts in the per-expert layout of the Hub checkpoints, but Trainer's resume loads the
    file as a raw, non-strict state dict: the fused expert and router weights would silently keep their start values.
    from_pretrained converts the layout. Adapter checkpoints are loaded by PEFT and need none of this.
    """
    if (checkpoint / "adapter_config.json").is_file():
        return
    saved = type(trainer.model).from_pretrained(str(checkpoint), dtype=trainer.model.dtype)
    trainer.model.load_state_dict(saved.state_dict())


def remove_checkpoints(stage: Stage) -> None:
    """The committed output holds the final weights; checkpoints (with optimizer state) were only for resuming."""
    for _, path in checkpoints(stage.work):
        shutil.rmtree(path)


def save_stage(trainer, tokenizer, recipe: Recipe, stage: Stage, parent: str) -> Path:
    """Write weights or adapter, tokenizer, resolved recipe and metrics; then commit the stage."""
    remove_checkpoints(stage)
    trainer.save_model(str(stage.work))
    tokenizer.save_pretrained(str(stage.work))
    (stage.work / "recipe.yaml").write_text(dump_recipe(recipe))
    history = trainer.state.log_history
    (stage.work / "metrics.json").write_text(json.dumps(history, indent=1))
    kind = "adapter" if (stage.work / "adapter_config.json").is_file() else "full"
    losses = [entry["loss"] for entry in history if "loss" in entry]
    summary = {
        "kind": kind,
        "parent": parent,
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "runtime_s": next((e["train_runtime"] for e in history if "train_runtime" in e), None),
    }
    final = stage.commit(summary)
    print_summary(stage.name, summary, final, history)
    push_stage_if_configured(recipe, final)
    return final


def print_summary(name: str, summary: dict, folder: Path, history: list[dict]) -> None:
    cv = [entry["expert_load_cv_mean"] for entry in history if "expert_load_cv_mean" in entry]
    aux = [entry["aux_loss"] for entry in history if "aux_loss" in entry]
    print(f"[{name}] {summary['steps']} steps in {summary['runtime_s'] or 0:.0f}s; "
          f"loss {summary['first_loss']} -> {summary['last_loss']}"
          + (f"; router aux loss {aux[-1]:.4f}" if aux else "")
          + (f"; expert-load CV {cv[-1]:.3f}" if cv else "")
          + f". Saved {summary['kind']} to {folder}")
