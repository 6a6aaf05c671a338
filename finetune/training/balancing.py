"""Expert load balancing beyond the family's own aux loss: an aux-loss-free bias update and the router z-loss.

The aux loss (Mixtral, Qwen, OLMoE, gpt-oss, Granite, ...) is the model's own; TRL adds `router_aux_loss_coef *
aux_loss` in SFT and DPO, and packed DPO computes it as the padded batch would (finetune/training/packed_forward.py).
Families balanced without an aux loss (DeepSeek-V3, GLM-4.5, dots1; MiniMax-M2 and ERNIE 4.5 beside theirs) add an
`e_score_correction_bias` to the scores when choosing experts. Pre-training updates it after every step from the
observed load; `BiasUpdate` does the same in fine-tuning when `balancing.bias_update_rate` is set (DeepSeek-V3,
arXiv:2412.19437, section 2.1.2: each expert's bias moves by the rate, up when it got less than the mean load, down
when more). The router z-loss (ST-MoE, arXiv:2202.08906) penalises large router logits, for any family:
mean over real tokens of logsumexp(logits)^2, averaged over MoE layers.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import TrainerCallback

from finetune.modeling import moe
from finetune.training.expert_load import ExpertLoadTracker, RouterHooks
from finetune.config.recipe import BalancingConfig


class RouterZLoss(RouterHooks):
    """Collects each router's logits for the real tokens of a training forward; `take()` returns the z-loss."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.logits: list[torch.Tensor] = []

    def observe(self, name: str, router: nn.Module, output) -> None:
        self.logits.append(self.real_tokens(moe.router_logits(self.family, output, self.sizes)))

    def take(self) -> torch.Tensor | None:
        """The z-loss of the routers seen since the last call (None if none ran), with its gradient."""
        if not self.logits:
            return None
        per_layer = [torch.logsumexp(logits.float(), dim=-1).square().mean() for logits in self.logits]
        self.logits = []
        return torch.stack(per_layer).mean()


class BiasUpdate(TrainerCallback):
    """After each optimizer step, moves every `e_score_correction_bias` towards balance by DeepSeek-V3's sign rule."""

    def __init__(self, model: nn.Module, rate: float):
        self.biases = moe.bias_tensors(model)
        if not self.biases:
            raise ValueError("balancing.bias_update_rate is set, but this model has no e_score_correction_bias (its "
                             "family is not balanced by a bias); set balancing.bias_update_rate: 0.")
        self.rate = rate
        self.tracker = ExpertLoadTracker(model)
        self.block_of = {router: router.rsplit(".", 1)[0] for router in self.tracker.layers}

    def update(self) -> None:
        """One step of the rule on the load seen since the last update (summed over processes)."""
        for router, shares in self.tracker.take().items():
            if sum(shares) == 0:
                continue
            bias = self.biases.get(self.block_of[router])
            if bias is None:  # a block routed without a bias (DeepSeek-V4's hash-routed first layers)
                continue
            load = torch.tensor(shares, dtype=torch.float32)
            step = (self.rate * torch.sign(load.mean() - load)).to(bias.device, bias.dtype)
            with torch.no_grad():
                # LongCat-Flash's bias also has entries for its zero-computation experts, after the routed ones: no
                # expert runs for them, their load is not counted, and they keep their value.
                bias.view(-1)[:step.numel()] += step

    def on_step_end(self, args, state, control, **kwargs):
        self.update()

    def on_train_end(self, args, state, control, **kwargs):
        self.tracker.remove()


def add_router_z_loss(trainer, model: nn.Module, coef: float) -> None:
    """Add coef * z-loss to the trainer's loss and log it as `router_z_loss` (as TRL logs aux_loss)."""
    z_loss = RouterZLoss(model)
    compute_loss = trainer.compute_loss

    @functools.wraps(compute_loss)
    def with_z_loss(model, inputs, return_outputs=False, **kwargs):
        z_loss.take()  # drop logits of forwards outside training (a precomputed reference pass, evaluation)
        result = compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        value = z_loss.take()
        if value is None:
            return result
        mode = "train" if model.training else "eval"
        trainer._metrics[mode]["router_z_loss"].append(trainer.accelerator.gather_for_metrics(value.detach()).mean().item())
        if return_outputs:
            return result[0] + coef * value, result[1]
        return result + coef * value

    trainer.compute_loss = with_z_loss


def attach(trainer, model: nn.Module, config: BalancingConfig) -> None:
    """The recipe's `balancing:` settings on a TRL SFT or DPO trainer of `model` (nothing when both are 0)."""
    if not moe.is_moe_model(model):
        return
    if config.router_z_loss_coef:
        add_router_z_loss(trainer, model, config.router_z_loss_coef)
    if config.bias_update_rate:
        trainer.add_callback(BiasUpdate(model, config.bias_update_rate))
