"""Routing telemetry on weights that PyTorch FSDP2 really shards, on CPU processes (gloo).

accelerate runs an FSDP launch on CPUs as plain DDP (finetune/core/distributed.py warns), so the CLI cannot shard
on this project's machines. This script does what accelerate's FSDP2 preparation does to the model (`fully_shard` on
each decoder layer, then on the whole model) and drives the routing-drift and expert-load callbacks through a few
training steps as the Trainer calls them: on_train_begin, on_log after each optimizer step, on_train_end.

    python -m helpers.fsdp2_telemetry OUT [--off]                      # one process, nothing sharded
    torchrun --standalone --nproc-per-node 2 -m helpers.fsdp2_telemetry OUT [--off]

Each process trains on its half of every batch (equal-length sequences, so the mean of the halves' losses is the
whole batch's); rank 0 writes OUT/routing_drift.json, OUT/expert_load.json and OUT/losses.json (the loss and the
gradient norm of each step, reduced over processes, and the shape of rank 0's shard of a router weight). --off: the same training without the callbacks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import TrainerControl, TrainerState

from finetune.config.recipe import RoutingConfig
from finetune.core import distributed
from finetune.modeling import moe
from finetune.training.expert_load import expert_load_callbacks
from finetune.training.routing_drift import RoutingDriftCallback, my_share
from helpers.tiny import tiny_model

STEPS, BATCH, LENGTH, LEARNING_RATE = 3, 8, 24, 0.5


def sequences(count: int, seed: int, vocab: int) -> list[list[int]]:
    """Token ids of varied lengths (the probe pads them)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (int(torch.randint(8, 20, (1,), generator=generator)),), generator=generator)
            .tolist() for _ in range(count)]


def shard(model) -> None:
    """accelerate's FSDP2 preparation: each decoder layer one shard group, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (distributed.world_size(),))
    layers = tuple(moe.decoder_layer_classes(model))
    for module in list(model.modules()):
        if isinstance(module, layers):
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh)


def grad_norm(model) -> float:
    """The whole gradient's norm (a sharded gradient is gathered: every process must call this)."""
    total = 0.0
    for param in model.parameters():
        if param.grad is not None:
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            total += float(grad.double().pow(2).sum())
    return total ** 0.5


def main(out: Path, telemetry: bool) -> None:
    if distributed.world_size() > 1:
        distributed.process_state()  # joins the gloo group
    model, tokenizer = tiny_model()
    model.config.output_router_logits = False
    vocab = model.config.vocab_size
    callbacks = []
    if telemetry:
        out.mkdir(parents=True, exist_ok=True)
        config = RoutingConfig(probe_sequences=8, max_overhead=None, pair_sample=8)
        probe = sequences(8, 1, vocab)
        prompts, answers = sequences(8, 2, vocab), sequences(16, 3, vocab)
        pairs = {side: [(p + a, [False] * len(p) + [True] * len(a)) for p, a in zip(prompts, answers[i::2])]
                 for i, side in enumerate(("chosen", "rejected"))}
        callbacks = [RoutingDriftCallback(model, config, "sft", out, probe, pairs, tokenizer.pad_token_id, 2),
                     *expert_load_callbacks(model, out, config, "sft")]
    if distributed.world_size() > 1:
        shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    args, state, control = SimpleNamespace(device=torch.device("cpu")), TrainerState(), TrainerControl()
    state.is_world_process_zero = state.is_local_process_zero = distributed.is_main_process()
    model.train()
    for callback in callbacks:
        callback.on_train_begin(args, state, control, model=model)
    generator = torch.Generator().manual_seed(4)
    history = []
    for step in range(1, STEPS + 1):
        ids = torch.randint(4, vocab, (BATCH, LENGTH), generator=generator)
        mine = torch.stack(my_share(list(ids)))
        loss = model(input_ids=mine, attention_mask=torch.ones_like(mine), labels=mine).loss
        loss.backward()  # FSDP2 averages the gradients over processes: the whole batch's mean loss
        norm = grad_norm(model)
        optimizer.step()
        optimizer.zero_grad()
        mean_loss = float(distributed.sum_across_processes(loss.detach().double().reshape(1))) / distributed.world_size()
        state.global_step = step
        logs = {"loss": mean_loss}
        for callback in callbacks:
            callback.on_log(args, state, control, logs=logs, model=model)
        history.append({"step": step, "loss": mean_loss, "grad_norm": norm,
                        **{key: value for key, value in logs.items() if key != "loss"}})
    for callback in callbacks:
        callback.on_train_end(args, state, control, model=model)
    if distributed.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / "losses.json").write_text(json.dumps({"steps": history, "router_shard": router_shard(model)}, indent=1))


def router_shard(model) -> list[int]:
    """The shape of the first router weight this process holds: a shard under FSDP2."""
    name, router = next(iter(moe.routers(model).items()))
    weight = moe.router_weight(model, name, router)
    return list(weight.to_local().shape if hasattr(weight, "to_local") else weight.shape)


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--off" not in sys.argv[2:])
