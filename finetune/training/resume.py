"""Training a stage's model: from the newest usable checkpoint, on the recipe's checkpoint schedule, stopping
cleanly on SIGTERM or Ctrl-C so that a re-run resumes."""

from __future__ import annotations

import signal
from pathlib import Path

from transformers import TrainerCallback

from finetune.core import distributed
from finetune.training.checkpoints import SaveEveryMinutes, SealCheckpoints, newest_usable_checkpoint
from finetune.config.recipe import CheckpointConfig
from finetune.core.rundir import Interrupted, Stage
from finetune.training.trainer_config import describe_global_batch
from finetune.modeling import expert_parallel


class StopOnSignal(TrainerCallback):
    """On SIGTERM/Ctrl-C, finish the current step, save a checkpoint and stop, so a re-run can resume from it."""

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGINT

    def request(self, signum, frame) -> None:
        self.requested, self.signum = True, signum

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
        raise Interrupted(f"[{stage.name}] interrupted at step {trainer.state.global_step}; checkpoint saved in "
                          f"{stage.work}. Run the same command again to resume from it.", stopper.signum)


def restore_full_weights(trainer, checkpoint: Path) -> None:
    """Load a full-model checkpoint's weights through from_pretrained before Trainer resumes.

    transformers saves MoE experts in the per-expert layout of the Hub checkpoints, but Trainer's resume loads the
    file as a raw, non-strict state dict: the fused expert and router weights would silently keep their start values.
    from_pretrained converts the layout. Adapter checkpoints are loaded by PEFT and need none of this.
    """
    if (checkpoint / "adapter_config.json").is_file() or trainer.is_deepspeed_enabled:
        return  # DeepSpeed restores the weights from its own files (global_step<N>/), in the model's layout
    if expert_parallel.is_split(trainer.model):
        return  # the trainer's own checkpoint loading puts them into the split model (split_checkpoints.py)
    saved, info = type(trainer.model).from_pretrained(str(checkpoint), dtype=trainer.model.dtype,
                                                      output_loading_info=True)
    trainer.model.load_state_dict(saved.state_dict())  # strict: every weight of the model is restored
    if not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        # from_pretrained used every tensor of the file and filled every weight, so Trainer's own raw load of the
        # same file, which then reports the fused experts and routers as missing and the per-expert tensors as
        # unexpected, has nothing to say: its warning would make a bit-identical resume look broken.
        trainer._issue_warnings_after_load = lambda load_result: None
