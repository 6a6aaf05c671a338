"""Same math as TRL: a trainer's loss and gradients on one batch, and how far two of them differ. The tests hold
moetune's packed trainers to TRL's with these, and so do the benchmarks and the GPU check (benchmarks/dpo_bench.py,
benchmarks/gpu_check.py), which import this module as tests.helpers.parity (it imports no other helper).
"""

from __future__ import annotations

import torch


def loss_and_gradients(trainer, examples: list[dict]):
    """The training loss on one batch and the gradient of every trainable parameter: zero for one the loss does not
    reach (a DeepSeek Sparse Attention indexer runs under no_grad in transformers)."""
    batch = trainer.data_collator(examples)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    loss.backward()
    grads = {name: param.grad.clone() if param.grad is not None else torch.zeros_like(param)
             for name, param in trainer.model.named_parameters() if param.requires_grad}
    return loss.detach(), grads


def relative_differences(reference, candidate) -> tuple[float, float]:
    """(loss, worst gradient) differences relative to the reference's loss and each gradient's largest entry."""
    (loss_a, grads_a), (loss_b, grads_b) = reference, candidate
    worst = max(((grads_a[n] - grads_b[n]).abs().max() / grads_a[n].abs().max().clamp(min=1e-12)).item()
                for n in grads_a)
    return abs(loss_a.item() - loss_b.item()) / abs(loss_a.item()), worst


# Largest relative differences (loss; worst gradient, against its largest entry) between TRL's DPO and moetune's on the
# same batch, by dtype: fp32 rounding, or bf16's 8-bit mantissa (log-probs summed over many tokens, attention run
# two ways). The tests and the GPU check (benchmarks/gpu_check.py) hold the math to these.
SAME_MATH = {"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 1e-1)}
