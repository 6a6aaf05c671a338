"""The memory plan against the measured peak of a training step, on this CPU (README "Memory plan").

Each row builds a look-alike Qwen3-MoE checkpoint (real config class, dims multiples of 64), long conversations that
fill every sequence to max_length, and a recipe; it runs `moetune prep` (and a 1-step SFT before DPO) unmeasured,
then the measured stage (1 step) in a subprocess that records its peak resident memory (ru_maxrss) after importing
moetune and its libraries (the baseline) and at the end. measured = peak - baseline; the plan's figure is its total
less its framework-overhead row (the baseline is that overhead).

    python -m benchmarks.plan_memory [--rows 0,3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

LORA = {"targets": ["attention", "experts"], "r": 16, "alpha": 32}
NF4 = {"bits": 4, "double_quant": True}
# name, stage, lora, quantization, batch (sequences or pairs), max_length, reference cache
ROWS = [
    ("SFT full, 16 x 512 tokens", "sft", None, None, 16, 512, True),
    ("SFT LoRA, 4 x 2k tokens", "sft", LORA, None, 4, 2048, True),
    ("SFT LoRA, 1 x 8k tokens", "sft", LORA, None, 1, 8192, True),
    ("SFT QLoRA (NF4 experts), 4 x 2k tokens", "sft", LORA, NF4, 4, 2048, True),
    ("DPO full, reference cached, 4 pairs x 1k", "dpo", None, None, 4, 1024, True),
    ("DPO full, reference copy, 4 pairs x 1k", "dpo", None, None, 4, 1024, False),
    ("DPO LoRA, 2 pairs x 2k", "dpo", LORA, None, 2, 2048, True),
]
SIZES = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, intermediate_size=512,
             max_position_embeddings=16384)

MEASURE = """
import resource, sys
import finetune.cli, trl, peft, datasets  # the libraries every stage loads: the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = finetune.cli.main(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("MEASURED", base * 1024, peak * 1024, code)
sys.exit(code)
"""


def build_model(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, GenerationConfig

    from helpers.lookalike import FAMILIES, family_config, train_family_tokenizer

    family = FAMILIES["qwen3_moe"]
    tokenizer = train_family_tokenizer(family)
    ids = {"eos_token_id": tokenizer.convert_tokens_to_ids(family.eos),
           "pad_token_id": tokenizer.convert_tokens_to_ids(family.pad)}
    config = family_config("qwen3_moe", vocab_size=len(tokenizer), **SIZES, **ids)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(**ids, do_sample=False).save_pretrained(folder)
    return folder


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sort", "digits", "reply"])
                    + str(rng.randrange(100)) for _ in range(n))


def write_data(folder: Path, rows: int = 64) -> None:
    """Conversations long enough to fill 8k tokens, so every batch is full (the plan's peak case)."""
    rng = random.Random(0)
    with open(folder / "sft.jsonl", "w") as sft, open(folder / "pairs.jsonl", "w") as pairs:
        for _ in range(rows):
            prompt = [{"role": "user", "content": words(rng, 40)}]
            sft.write(json.dumps({"messages": prompt + [{"role": "assistant", "content": words(rng, 5000)}]}) + "\n")
            pairs.write(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": words(rng, 5000)}],
                                    "rejected": [{"role": "assistant", "content": words(rng, 5000)}]}) + "\n")


def recipe_for(folder: Path, model: Path, data: Path, row) -> Path:
    _, stage, lora, quantization, batch, length, cache = row
    train = {"max_steps": 1, "per_device_train_batch_size": batch, "max_length": length, "logging_steps": 1}
    recipe = {"run_dir": str(folder / "run"), "seed": 0,
              "model": {"name_or_path": str(model), "lora": lora, "quantization": quantization},
              "data": {"sources": [{"format": "sft", "path": str(data / "sft.jsonl")},
                                   {"format": "preference", "path": str(data / "pairs.jsonl")}],
                       "test_size": 0, "dedup": "none"},
              "sft": {**train, "per_device_train_batch_size": batch if stage == "sft" else 1,
                      "max_length": length if stage == "sft" else 512},  # DPO rows: a short SFT first
              "dpo": train, "speed": {"reference_cache": cache}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def moetune(*args: str) -> str:
    result = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0 or "MEASURED" not in result.stdout:
        raise SystemExit(f"moetune {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def measure(recipe: Path, stage: str) -> float:
    moetune("prep", str(recipe))
    if stage == "dpo":
        moetune("sft", str(recipe))
    line = next(line for line in moetune(stage, str(recipe)).splitlines() if line.startswith("MEASURED"))
    _, base, peak, code = line.split()
    return float(peak) - float(base)


def planned(recipe: Path, stage: str) -> float:
    from finetune.training import stage_plan
    from finetune.config.parsing import load_recipe

    loaded = load_recipe(str(recipe))
    plan = stage_plan.plan_recipe(loaded, stage_plan.make_target(loaded), [stage], with_time=False)[0]
    return plan.total - plan.rows["overhead"], plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", help="Comma-separated row numbers (default: all).")
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep it.")
    args = parser.parse_args()
    chosen = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    work = args.keep or Path(tempfile.mkdtemp(prefix="plan-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").is_file():
        build_model(model)
    write_data(work)
    MiB = 2**20
    print("| row | plan (MiB) | measured peak over baseline (MiB) | plan / measured | largest planned parts |")
    print("|---|---|---|---|---|")
    for row in chosen:
        folder = work / row[0].split(",")[0].replace(" ", "-").lower() / str(ROWS.index(row))
        folder.mkdir(parents=True, exist_ok=True)
        recipe = recipe_for(folder, model, work, row)
        plan_bytes, plan = planned(recipe, row[1])
        measured = measure(recipe, row[1])
        parts = ", ".join(f"{name} {size / MiB:.0f}" for name, size in
                          sorted(plan.rows.items(), key=lambda item: -item[1]) if name != "overhead" and size > MiB)
        print(f"| {row[0]} | {plan_bytes / MiB:.0f} | {measured / MiB:.0f} | {plan_bytes / measured:.2f} | {parts} |",
              flush=True)


if __name__ == "__main__":
    main()
