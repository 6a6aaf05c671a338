"""The experts kernels of transformers on one MoE layer of a given shape: forward and backward, side by side.

`model.experts_implementation` picks among transformers' kernels: `eager` (a Python loop over the experts a batch
hits) and `grouped_mm` (tokens sorted by expert, one grouped matmul per projection: already a sorted-token kernel).
`batched_mm` is left out on a CPU, where it is 30-40x slower (it gathers one weight matrix per token).
"""

from __future__ import annotations

import statistics
import time

KERNELS = ("eager", "grouped_mm")


def compare(config, quick: bool = False) -> str:
    """A markdown table: median time of one MoE layer's forward and backward on `tokens` tokens, per kernel,
    rounds interleaved."""
    import torch
    from transformers import AutoModelForCausalLM

    tokens, rounds = (256, 2) if quick else (4096, 5)
    torch.manual_seed(0)
    layer = AutoModelForCausalLM.from_config(config).model.layers[0].mlp
    hidden = torch.randn(1, tokens, config.hidden_size)
    times = {kernel: [] for kernel in KERNELS}
    outputs = {}
    for _ in range(rounds):
        for kernel in KERNELS:
            layer.experts.config._experts_implementation = kernel
            layer.zero_grad()
            start = time.perf_counter()
            output = layer(hidden.clone().requires_grad_())
            output = output[0] if isinstance(output, tuple) else output
            output.pow(2).mean().backward()
            times[kernel].append(time.perf_counter() - start)
            outputs[kernel] = output.detach()
    same = torch.allclose(outputs["eager"], outputs["grouped_mm"], rtol=1e-4, atol=1e-5)
    eager = statistics.median(times["eager"])
    lines = [f"One MoE layer ({tokens} tokens, forward and backward, {rounds} interleaved rounds, medians); "
             f"outputs {'equal' if same else 'NOT EQUAL'} across kernels.", "",
             "| experts_implementation | ms | x eager |", "|---|---|---|"]
    for kernel in KERNELS:
        median = statistics.median(times[kernel])
        lines.append(f"| {kernel} | {1000 * median:,.0f} | {eager / median:.2f} |")
    return "\n".join(lines)
