"""TRL's SFTConfig/DPOConfig for a stage: moetune's device-aware defaults under the recipe's own fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from finetune.modeling.loading import resolve_dtype
from finetune.config.recipe import TrainerSettings
from finetune.config.parsing import trainer_config_class


ASSISTANT_ONLY_LOSS = True  # moetune's SFT default (TRL's is False): loss on the assistant's replies only


def device_defaults(dtype: str, on_gpu: bool | None = None) -> dict[str, Any]:
    """Defaults that depend on the machine: TRL's (bf16 on, checkpointing on) fail or crawl on a CPU.

    `dtype`: model.dtype. `on_gpu`: for a machine other than this one (a plan); None: this machine."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    weights = resolve_dtype(dtype, on_gpu)
    return {
        "use_cpu": not on_gpu,
        "bf16": on_gpu and weights == torch.bfloat16,
        "fp16": on_gpu and weights == torch.float16,
        # Activation checkpointing saves GPU memory; on a CPU it only costs time. (transformers 5's name for
        # gradient_checkpointing, which it still accepts with a FutureWarning.)
        "activation_checkpointing": on_gpu,
    }


def moetune_defaults(settings: TrainerSettings, on_gpu: bool | None = None) -> dict[str, Any]:
    """The TRL fields moetune sets unless the recipe does (what `moetune sft --trl-fields` shows as defaults)."""
    values: dict[str, Any] = {
        "report_to": "none",
        "logging_steps": 10,
        # No step schedule: checkpoints come every `checkpoints.every_minutes` and on SIGTERM/Ctrl-C (train_resuming).
        "save_strategy": "no",
        "save_total_limit": 2,  # of either kind: enough to fall back on when the newest was cut short
        "data_seed": settings.seed,
        **device_defaults(settings.dtype, on_gpu),
    }
    if settings.stage == "sft":
        values["assistant_only_loss"] = ASSISTANT_ONLY_LOSS
    if settings.stage == "dpo":
        values["precompute_ref_log_probs"] = settings.reference_cache
    return values


def stage_values(settings: TrainerSettings, on_gpu: bool | None = None) -> dict[str, Any]:
    """The TRL fields a stage sets: moetune's defaults, then every field the recipe sets (the recipe wins)."""
    values = moetune_defaults(settings, on_gpu)
    if "gradient_checkpointing" in settings.fields:
        values.pop("activation_checkpointing")  # the recipe's older name would otherwise lose to moetune's default
    values.update(settings.fields)
    return values


def stage_value(settings: TrainerSettings, name: str, on_gpu: bool | None = None) -> Any:
    """One field of a stage's TRL config as it will run (recipe, else moetune's default, else TRL's), without
    building the config (which checks the machine: bf16 on a CPU fails)."""
    values = stage_values(settings, on_gpu)
    if name == "activation_checkpointing" and "gradient_checkpointing" in values:
        return values["gradient_checkpointing"]
    if name in values:
        return values[name]
    return next(f for f in dataclasses.fields(trainer_config_class(settings.stage)) if f.name == name).default


def trainer_config(settings: TrainerSettings, output_dir: Path):
    """TRL's SFTConfig/DPOConfig: moetune's defaults, then every field the recipe sets (the recipe wins)."""
    values = stage_values(settings)
    values.update(output_dir=str(output_dir), seed=settings.seed)
    config_class = trainer_config_class(settings.stage)
    return config_class(**as_float_where_declared(config_class, values))


def checkpointing_the_model_runs(args, model, settings: TrainerSettings) -> None:
    """Activation checkpointing is moetune's GPU default, but transformers refuses it for some models (JetMoE:
    `supports_gradient_checkpointing = False`, and the trainer would stop with a traceback when it turns it on).
    moetune's default is dropped with a note; a recipe that asks for it is refused naming its key."""
    if not args.activation_checkpointing or getattr(model, "supports_gradient_checkpointing", True):
        return
    name = type(getattr(model, "get_base_model", lambda: model)()).__name__
    asked = next((key for key in ("activation_checkpointing", "gradient_checkpointing") if settings.fields.get(key)), None)
    if asked:
        raise ValueError(f"{settings.stage}.{asked}: {name} does not support activation checkpointing "
                         f"(transformers); set {settings.stage}.{asked}: false")
    args.activation_checkpointing = False
    print(f"[{settings.stage}] activation checkpointing off: {name} does not support it (its activations stay in "
          "memory; `moetune plan` counts them)", flush=True)


def as_float_where_declared(config_class: type, values: dict[str, Any]) -> dict[str, Any]:
    """The recipe keeps `logging_steps: 25` an integer (manifests, recipe.yaml); TRL's float fields get floats, since
    some reach strictly typed model configs (`router_aux_loss_coef: 0` would be refused there)."""
    floats = {f.name for f in dataclasses.fields(config_class) if f.type in (float, float | None, "float", "float | None")}
    return {key: float(value) if key in floats and type(value) is int else value for key, value in values.items()}


def global_batch(args) -> int:
    """Sequences (SFT) or preference pairs (DPO) per optimizer step, over every process."""
    return args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps


def describe_global_batch(args) -> str:
    return (f"global batch {global_batch(args)} = {args.per_device_train_batch_size} per device x "
            f"{args.world_size} process{'es' if args.world_size > 1 else ''} x "
            f"{args.gradient_accumulation_steps} accumulation step{'s' if args.gradient_accumulation_steps > 1 else ''}")
