"""What SFT and DPO share: TRL configs with device-aware defaults, the datasets, and saving a stage's output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from datasets import load_dataset

from finetune.hub import push_stage_if_configured
from finetune.models import resolve_dtype
from finetune.moe import ExpertLoadCallback, is_moe_model
from finetune.recipe import Recipe, dump_recipe, trainer_config_class
from finetune.stage import Stage


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


def save_stage(trainer, tokenizer, recipe: Recipe, stage: Stage, parent: str) -> Path:
    """Write weights or adapter, tokenizer, resolved recipe and metrics; then commit the stage."""
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
