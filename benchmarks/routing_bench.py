"""What the routing-drift probe costs next to training, on the demo's model (recipes/tiny-moe.yaml: hidden 128,
3 layers, 4 experts top-2): median times over interleaved rounds of one SFT-like training step (a batch of 64
conversations, forward, backward, AdamW) and one probe pass (routing.probe_sequences held-out conversations, no
gradients, batches of 64), and the probe's share of training time at a given logging_steps.

Run: python -m benchmarks.routing_bench [--logging-steps 50] [--probe 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time


def measure(logging_steps: int, probe: int, rounds: int, batch_size: int = 64) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.config.recipe import ModelInit
    from finetune.core import families, synthetic_task
    from finetune.modeling import moe
    from finetune.modeling.tiny import init_config, train_tokenizer
    from finetune.training.routing_drift import RouterCapture, routed

    rows = [row["messages"] for row in synthetic_task.sft_conversations(batch_size + probe, 0)]
    tokenizer = train_tokenizer([m["content"] for row in rows for m in row], vocab_size=300)
    init = ModelInit(hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2,
                     num_experts=4, experts_per_token=2, vocab_size=300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(init_config(init, tokenizer))
    texts = [tokenizer.apply_chat_template(row, tokenize=False) for row in rows]
    train = tokenizer(texts[:batch_size], return_tensors="pt", padding=True)
    sequences = [tokenizer(text)["input_ids"] for text in texts[batch_size:]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    capture = RouterCapture(families.family_of(model), moe.routers(model), moe.routing_sizes(model))

    def step():
        model.train()
        model(**train, labels=train["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def probe_pass():
        for _ in routed(model, capture, sequences, "cpu", tokenizer.pad_token_id, batch_size):
            pass

    times = {"step": [], "probe": []}
    step(), probe_pass()  # warm-up
    for _ in range(rounds):
        for name, run in (("step", step), ("probe", probe_pass)):
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    step_s, probe_s = statistics.median(times["step"]), statistics.median(times["probe"])
    return {"step_s": step_s, "probe_s": probe_s, "probe_tokens": sum(map(len, sequences)),
            "step_tokens": int(train["attention_mask"].sum()), "overhead": probe_s / (logging_steps * step_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logging-steps", type=int, default=50)
    parser.add_argument("--probe", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = measure(args.logging_steps, args.probe, args.rounds)
    print(f"training step {result['step_s']:.3f} s ({result['step_tokens']} tokens); probe pass {result['probe_s']:.3f} s "
          f"({args.probe} sequences, {result['probe_tokens']} tokens); at logging_steps={args.logging_steps} the probe "
          f"takes {100 * result['overhead']:.1f}% of training time")


if __name__ == "__main__":
    main()
