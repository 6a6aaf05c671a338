"""How much load each expert gets in training, and alarms for experts that die or run hot.

Forward hooks on the routers (found by finetune/modeling/moe.py) see the experts chosen for the real (non-padding)
tokens of training forwards, padded or padding-free. Each log line gets the load's coefficient of variation per
layer, and `expert_load.json` keeps every layer's shares over the logged steps and the alarms raised: an expert whose share
stays under `routing.dead_load` times the uniform share (dead) or over `routing.hot_load` times it (hot) for
`routing.alarm_logs` logging steps in a row is named once, with its layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from finetune.core import distributed, families
from finetune.modeling import moe
from finetune.config.recipe import RoutingConfig


def coefficient_of_variation(shares: list[float]) -> float:
    """Imbalance of one layer's expert load: 0 when balanced, sqrt(E-1) when one expert takes everything."""
    values = torch.tensor(shares, dtype=torch.float64)
    mean = values.mean()
    return float(values.std(unbiased=False) / mean) if mean > 0 else 0.0


class RouterHooks:
    """Forward hooks on every router that see its output for the real (non-padding) tokens of training forwards.

    A pre-hook on the model reads the attention mask so padding is left out; forwards without gradients
    (reference model, evaluation, the routing-drift probe) are ignored. Subclasses say what to do with each router's
    output (`observe`).
    """

    def __init__(self, model: nn.Module):
        found = moe.routers(model)
        self.family = families.family_of(model)
        self.sizes = moe.routing_sizes(model) if found else (0, 0)
        self.layers = list(found)
        self.mask: torch.Tensor | None = None
        self.handles = [model.register_forward_pre_hook(self.remember_mask, with_kwargs=True)]
        for name, module in found.items():
            self.handles.append(module.register_forward_hook(self.hook(name)))

    def remember_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.mask = mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def real_tokens(self, per_token: torch.Tensor) -> torch.Tensor:
        """The rows of a (tokens, ...) router output that belong to real tokens."""
        if self.mask is not None and self.mask.numel() == per_token.shape[0]:
            return per_token[self.mask.to(per_token.device)]
        return per_token

    def hook(self, name: str):
        def hook(module, args, output):
            if torch.is_grad_enabled():
                self.observe(name, module, output)
        return hook

    def observe(self, name: str, router: nn.Module, output) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ExpertLoadTracker(RouterHooks):
    """Counts, per MoE layer, how many real (non-padding) tokens each expert receives in training forwards."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.counts = {name: torch.zeros(moe.num_experts(model, name, module), dtype=torch.long)
                       for name, module in moe.routers(model).items()}

    def observe(self, name: str, router: nn.Module, output) -> None:
        indices = self.real_tokens(moe.top_k_indices(self.family, output, router, self.sizes).detach()).reshape(-1)
        # indices past the routed experts are LongCat-Flash's zero-computation experts: no expert runs for them
        indices = indices[indices < len(self.counts[name])]
        self.counts[name] += torch.bincount(indices.cpu(), minlength=len(self.counts[name]))

    def take(self) -> dict[str, list[float]]:
        """Each layer's share of routed tokens per expert since the last call, over all processes; resets the counts.

        In a multi-process run every process must call this at the same step (Trainer logs on every process).
        """
        shares = {}
        for name, local_counts in self.counts.items():
            counts = distributed.sum_across_processes(local_counts.clone())
            local_counts.zero_()
            total = int(counts.sum())
            shares[name] = [round(int(c) / total, 6) for c in counts] if total else [0.0] * len(counts)
        return shares


class LoadAlarms:
    """Names, once each, the experts whose share stays dead (under dead_load / E) or hot (over hot_load / E) for
    `alarm_logs` logged steps in a row."""

    def __init__(self, config: RoutingConfig, stage: str):
        self.config, self.stage = config, stage
        self.streaks: dict[tuple[str, int, str], int] = {}
        self.raised: list[dict] = []

    def rule(self) -> dict:
        return {"dead_load": self.config.dead_load, "hot_load": self.config.hot_load,
                "alarm_logs": self.config.alarm_logs}

    def check(self, step: int, shares: dict[str, list[float]]) -> None:
        for layer, layer_shares in shares.items():
            uniform = 1 / len(layer_shares)
            for expert, share in enumerate(layer_shares):
                self.count(step, layer, expert, "dead", share, share < self.config.dead_load * uniform)
                self.count(step, layer, expert, "hot", share, share > self.config.hot_load * uniform)

    def count(self, step: int, layer: str, expert: int, kind: str, share: float, now: bool) -> None:
        key = (layer, expert, kind)
        self.streaks[key] = self.streaks.get(key, 0) + 1 if now else 0
        if self.streaks[key] != self.config.alarm_logs:  # equal once per streak; named once per run below
            return
        if any((a["layer"], a["expert"], a["kind"]) == key for a in self.raised):
            return
        bound = (f"under {self.config.dead_load}x" if kind == "dead" else f"over {self.config.hot_load}x")
        alarm = {"kind": kind, "layer": layer, "expert": expert, "step": step, "share": share,
                 "why": f"share {bound} uniform for {self.config.alarm_logs} logging steps"}
        self.raised.append(alarm)
        if distributed.is_main_process():
            print(f"[{self.stage}] expert-load alarm at step {step}: {kind} expert {expert} in {layer} "
                  f"(share {share:.4f}, {alarm['why']})", flush=True)


class ExpertLoadCallback(TrainerCallback):
    """Adds expert-load imbalance to the trainer logs, raises load alarms and writes both to `expert_load.json`."""

    def __init__(self, model: nn.Module, output_file: Path, config: RoutingConfig, stage: str):
        self.tracker = ExpertLoadTracker(model)
        self.alarms = LoadAlarms(config, stage)
        self.output_file = Path(output_file)
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        shares = self.tracker.take()
        cvs = {layer: coefficient_of_variation(s) for layer, s in shares.items() if sum(s) > 0}
        if not cvs:
            return
        values = {"expert_load_cv_mean": round(sum(cvs.values()) / len(cvs), 4),
                  "expert_load_cv_max": round(max(cvs.values()), 4)}
        logs.update(values)  # printed and sent to loggers
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # the Trainer copied `logs` into the history before callbacks ran
        self.alarms.check(state.global_step, {layer: shares[layer] for layer in cvs})
        self.history.append({"step": state.global_step, "share": shares, "cv": cvs})

    def on_train_end(self, args, state, control, **kwargs):
        self.tracker.remove()
        if state.is_world_process_zero:
            self.output_file.write_text(json.dumps(
                {"layers": self.tracker.layers, "history": self.history, "alarms": self.alarms.raised,
                 "alarm_rule": self.alarms.rule()}, indent=1))


def expert_load_callbacks(model: nn.Module, folder: Path, config: RoutingConfig, stage: str) -> list:
    """Expert-load tracking into folder/expert_load.json, for MoE models (none for a dense model)."""
    return [ExpertLoadCallback(model, folder / "expert_load.json", config, stage)] if moe.is_moe_model(model) else []
