"""The scored LM head's log-prob kernels on a CPU, side by side: TRL's chunked kernel (its torch fallback without
Triton) and moetune's tiles (speed.tiled_lm_head), forward and backward as in a LoRA step (LM head frozen) and
forward alone as in a reference pass.

Run: python -m benchmarks.lm_head_bench (also part of the fine shape in `python -m benchmarks.dpo_bench`).
"""

from __future__ import annotations

import statistics
import time

DPO_FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1")  # what TRL's DPO asks of the policy's head


def compare(hidden_size: int, vocab_size: int, quick: bool = False) -> str:
    """A markdown table of median times over interleaved rounds, per kernel and pass."""
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from finetune.modeling.lm_head_tiles import tiled_log_probs
    from finetune.training.scored_lm_head import LOGPROB_CHUNK

    tokens, rounds = (256, 2) if quick else (1024, 5)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab_size, hidden_size, generator=generator) * 0.05
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    targets = torch.randint(0, vocab_size, (tokens,), generator=generator)
    kernels = {"TRL's chunked kernel": lambda h: ChunkedLogProbFunction.apply(
                   h, weight, None, targets, 1.0, LOGPROB_CHUNK, None, 1.0, DPO_FIELDS),
               "moetune's tiles": lambda h: tiled_log_probs(h, weight, None, targets, DPO_FIELDS)}

    def training(kernel):
        leaf = hidden.clone().requires_grad_()
        kernel(leaf)[0].sum().backward()
        return leaf.grad

    def reference(kernel):
        with torch.no_grad():
            return kernel(hidden)[0]

    passes = {"forward and backward (LoRA step)": training, "forward, no grad (reference pass)": reference}
    times = {(kernel, name): [] for kernel in kernels for name in passes}
    results = {}
    for _ in range(rounds):
        for (kernel, name) in times:
            start = time.perf_counter()
            results[kernel, name] = passes[name](kernels[kernel])
            times[kernel, name].append(time.perf_counter() - start)
    same = all(torch.allclose(results["moetune's tiles", name], results["TRL's chunked kernel", name],
                              rtol=1e-4, atol=1e-5) for name in passes)
    lines = [f"{tokens} scored tokens, hidden {hidden_size}, vocabulary {vocab_size:,}, fp32, the fields TRL's DPO "
             f"asks; {rounds} interleaved rounds, medians; log-probs and gradients "
             f"{'equal' if same else 'NOT EQUAL'} across kernels.", "",
             "| pass | TRL's chunked kernel (ms) | moetune's tiles (ms) | x |", "|---|---|---|---|"]
    for name in passes:
        trl, ours = (statistics.median(times[kernel, name]) for kernel in kernels)
        lines.append(f"| {name} | {1000 * trl:,.0f} | {1000 * ours:,.0f} | {trl / ours:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(compare(hidden_size=128, vocab_size=151_936))
