"""The end of a training stage: weights or adapter, tokenizer, resolved recipe and metrics, then the commit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from finetune.core import distributed
from finetune.modeling import flat_experts
from finetune.training.checkpoints import checkpoints
from finetune.core.rundir import Stage
from finetune.training.trainer_config import global_batch


class CheckpointLayoutSaves:
    """Trainer mixin: the weights Trainer writes (the stage's output and every checkpoint) in the checkpoint's own
    layout. Under DeepSpeed ZeRO-3, Trainer saves a state dict that DeepSpeed gathered parameter by parameter, past
    the modules' state-dict hooks, so DBRX's experts would be written 3-D as moetune views them: flattened here."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict is not None:
            flat_experts.flatten_state_dict(self.model, state_dict)
        super()._save(output_dir, state_dict=state_dict)


def remove_checkpoints(stage: Stage) -> None:
    """The committed output holds the final weights; checkpoints (with optimizer state) were only for resuming."""
    for _, path in checkpoints(stage.work):
        shutil.rmtree(path)


def save_stage(trainer, tokenizer, recipe_text: str, stage: Stage, parent: str) -> Path:
    """Write weights or adapter, tokenizer, resolved recipe (`recipe_text`) and metrics; then commit the stage.

    Every process calls this: saving gathers ZeRO-3/FSDP shards from all of them, and Trainer writes the weights
    from the main process only. The other files and the summary are the main process's alone.
    """
    distributed.check_replicas_agree(trainer.model, stage.name)
    main = distributed.is_main_process()
    if main:
        remove_checkpoints(stage)
    trainer.save_model(str(stage.work))
    summary = write_stage_files(trainer, tokenizer, recipe_text, stage, parent) if main else {}
    final = stage.commit(summary)
    if main:
        print_summary(stage.name, summary, final, trainer.state.log_history)
    return final


def write_stage_files(trainer, tokenizer, recipe_text: str, stage: Stage, parent: str) -> dict:
    """Tokenizer, resolved recipe and metrics next to the weights; returns the manifest's summary."""
    tokenizer.save_pretrained(str(stage.work))
    (stage.work / "recipe.yaml").write_text(recipe_text)
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
        "mean_loss": next((e["train_loss"] for e in history if "train_loss" in e), None),
        "runtime_s": next((e["train_runtime"] for e in history if "train_runtime" in e), None),
    }


def describe_loss(summary: dict) -> str:
    """Losses to 4 significant figures; a run shorter than logging_steps logged only its mean."""
    if summary["first_loss"] is not None:
        return f"loss {summary['first_loss']:.4g} -> {summary['last_loss']:.4g}"
    if summary.get("mean_loss") is not None:
        return f"mean loss {summary['mean_loss']:.4g} (no step logged: fewer steps than logging_steps)"
    return "no loss logged"


def print_summary(name: str, summary: dict, folder: Path, history: list[dict]) -> None:
    cv = [entry["expert_load_cv_mean"] for entry in history if "expert_load_cv_mean" in entry]
    aux = [entry["aux_loss"] for entry in history if "aux_loss" in entry]
    print(f"[{name}] {summary['steps']} steps in {summary['runtime_s'] or 0:.0f}s; {describe_loss(summary)}"
          + (f"; router aux loss {aux[-1]:.4f}" if aux else "")
          + (f"; expert-load CV {cv[-1]:.3f}" if cv else "")
          + f". Saved {summary['kind']} to {folder}")
