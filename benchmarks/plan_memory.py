"""The memory plan against the measured peak of a training stage (docs/memory-plan.md).

Each row builds a checkpoint (real config class: a look-alike Qwen3-MoE here, dims multiples of 64; the GPU check's
part plan_memory passes Mixtral- and OLMoE-shaped ones), long conversations that fill every sequence to max_length,
and a recipe; it runs `moetune prep` (and a 1-step SFT before DPO) unmeasured, then the measured stage (1 step) in a
subprocess. On a CPU that process records its peak resident memory (ru_maxrss) after importing moetune and its
libraries (the baseline) and at the end: measured = peak - baseline, and the plan's figure is its total less its
framework-overhead row (the baseline is that overhead). On a GPU: torch.cuda.max_memory_allocated of the stage,
against the plan less its overhead row (the CUDA context and allocator slack, outside torch's counters). The
expert-parallel rows run `moetune run --accelerate ep` on 2 processes (gloo), each measuring itself
(benchmarks/peak_site); the larger figure counts.

    python -m benchmarks.plan_memory [--rows 0,3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

LORA = {"targets": ["attention", "experts"], "r": 16, "alpha": 32}
NF4 = {"bits": 4, "double_quant": True}
SIZES = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, intermediate_size=512,
             max_position_embeddings=16384)
# For the expert-parallel rows: experts hold 91% of the weights (16 of width 1,024), so splitting them shows
EXPERT_HEAVY = {**SIZES, "num_experts": 16, "moe_intermediate_size": 1024}


@dataclass(frozen=True)
class Row:
    name: str
    stage: str  # sft or dpo
    lora: dict | None
    quantization: dict | None
    batch: int  # sequences or pairs per device
    max_length: int
    cache: bool = True  # the DPO reference's log-probs cached
    expert_parallel: int = 1  # above 1: `--accelerate ep` with this many processes, the experts split across them
    model_type: str = "qwen3_moe"
    sizes: dict = field(default_factory=lambda: SIZES)


ROWS = [
    Row("SFT full, 16 x 512 tokens", "sft", None, None, 16, 512),
    Row("SFT LoRA, 4 x 2k tokens", "sft", LORA, None, 4, 2048),
    Row("SFT LoRA, 1 x 8k tokens", "sft", LORA, None, 1, 8192),
    Row("SFT QLoRA (NF4 experts), 4 x 2k tokens", "sft", LORA, NF4, 4, 2048),
    Row("DPO full, reference cached, 4 pairs x 1k", "dpo", None, None, 4, 1024),
    Row("DPO full, reference copy, 4 pairs x 1k", "dpo", None, None, 4, 1024, cache=False),
    Row("DPO LoRA, 2 pairs x 2k", "dpo", LORA, None, 2, 2048),
    # expert parallelism: 2 processes (gloo), each holding half of every layer's experts; per process
    Row("SFT full, experts split over 2 processes, 4 x 512 tokens", "sft", None, None, 4, 512, expert_parallel=2,
        sizes=EXPERT_HEAVY),
    Row("SFT full, the same on 1 process", "sft", None, None, 4, 512, sizes=EXPERT_HEAVY),
    Row("DPO full, experts split over 2 processes, reference cached, 2 pairs x 512", "dpo", None, None, 2, 512,
        expert_parallel=2, sizes=EXPERT_HEAVY),
]

# The stage in a process of its own. On a CPU: its peak resident set over the peak after importing the libraries every
# stage loads (the baseline); on a GPU: the peak of torch's allocator over the whole stage (nothing allocated before).
MEASURE = """
import resource, sys, torch
import finetune.cli, trl, peft, datasets
cuda = torch.cuda.is_available()
base = 0 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
code = finetune.cli.main(sys.argv[1:])
peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("MEASURED", base, peak, code)
sys.exit(code)
"""
PEAK_SITE = Path(__file__).resolve().parent / "peak_site"  # its sitecustomize measures each launched process


def build_model(folder: Path, model_type: str = "qwen3_moe", sizes: dict = SIZES, device: str = "cpu",
                dtype=torch.float32) -> Path:
    """A checkpoint of `model_type` with `sizes` (real config class), the Qwen3 look-alike tokenizer and chat
    template; built where it will train (on a GPU in bf16 it never exists in fp32 or in CPU memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from helpers import lookalike

    family = lookalike.FAMILIES["qwen3_moe"]
    tokenizer = lookalike.train_family_tokenizer(family)
    ids = {"eos_token_id": tokenizer.convert_tokens_to_ids(family.eos),
           "pad_token_id": tokenizer.convert_tokens_to_ids(family.pad)}
    config = AutoConfig.for_model(model_type, **{**lookalike.SIZES, "vocab_size": len(tokenizer), **sizes, **ids})
    torch.manual_seed(0)
    with torch.device(device):
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(folder)
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


def recipe_for(folder: Path, model: Path, data: Path, row: Row) -> Path:
    train = {"max_steps": 1, "per_device_train_batch_size": row.batch, "max_length": row.max_length,
             "logging_steps": 1}
    recipe = {"run_dir": str(folder / "run"), "seed": 0,
              "model": {"name_or_path": str(model), "lora": row.lora, "quantization": row.quantization,
                        "expert_parallel": row.expert_parallel},
              "data": {"sources": [{"format": "sft", "path": str(data / "sft.jsonl")},
                                   {"format": "preference", "path": str(data / "pairs.jsonl")}],
                       "test_size": 0, "dedup": "none"},
              "sft": {**train, "per_device_train_batch_size": row.batch if row.stage == "sft" else 1,
                      "max_length": row.max_length if row.stage == "sft" else 512},  # DPO rows: a short SFT first
              "dpo": train, "speed": {"reference_cache": row.cache}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def moetune(*args: str) -> str:
    result = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0 or "MEASURED" not in result.stdout:
        raise SystemExit(f"moetune {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def launched(recipe: Path, stage: str, processes: int, folder: Path) -> float:
    """`moetune run RECIPE --stages STAGE --accelerate ep --num-processes N` as a user runs it; each training process
    records its peak resident set over its own baseline (benchmarks/peak_site); the largest of them."""
    peaks = folder / "peaks"
    peaks.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "finetune", "run", str(recipe), "--stages", stage, "--accelerate", "ep",
               "--num-processes", str(processes), "--main-process-port", "29681"]
    env = {**os.environ, "MOETUNE_PEAK_DIR": str(peaks), "PYTHONPATH": f"{PEAK_SITE}{os.pathsep}{ROOT}"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    measured = [json.loads(path.read_text()) for path in sorted(peaks.glob("rank-*.json"))]
    assert len(measured) == processes, f"{len(measured)} of {processes} processes measured"
    return max(m["peak"] - m["base"] for m in measured)


def measure(recipe: Path, row: Row, folder: Path) -> float:
    """The measured stage's peak over its baseline, in bytes (prep, and the SFT before a DPO row, unmeasured)."""
    from finetune.cli import main as moetune_here

    if moetune_here(["prep", str(recipe)]) != 0:  # unmeasured: here, without a process start
        raise SystemExit(f"moetune prep {recipe} failed (its message is above)")
    shutil.rmtree(folder / "run" / row.stage, ignore_errors=True)  # measured afresh when --keep reuses the folder
    if row.stage == "dpo":
        moetune("sft", str(recipe))
    if row.expert_parallel > 1:
        return launched(recipe, row.stage, row.expert_parallel, folder)
    line = next(line for line in moetune(row.stage, str(recipe)).splitlines()
                if line.startswith("MEASURED"))
    _, base, peak, code = line.split()
    return float(peak) - float(base)


def planned(recipe: Path, row: Row):
    """The plan's peak for what `measure` counts: its total less the framework's overhead (the baseline on a CPU;
    the CUDA context and allocator slack, outside torch's counters, on a GPU). On the row's process count: a
    recipe with model.expert_parallel is planned in the ep layout."""
    from finetune.training import stage_plan
    from finetune.config.parsing import load_recipe

    loaded = load_recipe(str(recipe))
    target = stage_plan.make_target(loaded, processes=row.expert_parallel,
                                    layout="ep" if row.expert_parallel > 1 else "ddp")
    plan = stage_plan.plan_recipe(loaded, target, [row.stage], with_time=False)[0]
    return plan.total - plan.rows["overhead"], plan


def largest_parts(plan, limit: float = 2**20) -> str:
    return ", ".join(f"{name} {size / 2**20:.0f}" for name, size in sorted(plan.rows.items(), key=lambda item: -item[1])
                     if name != "overhead" and size > limit)


def measure_rows(rows: list[Row], work: Path, cuda: bool = False, dtype=torch.float32) -> list[dict]:
    """Each row planned and measured in `work`: one model folder per model shape, the long conversations once."""
    work.mkdir(parents=True, exist_ok=True)
    write_data(work)
    results = []
    for row in rows:
        index = ROWS.index(row) if row in ROWS else len(results)
        shape = hashlib.sha256(json.dumps(row.sizes, sort_keys=True).encode()).hexdigest()[:8]
        model = work / f"model-{row.model_type}-{shape}"
        if not (model / "config.json").is_file():
            build_model(model, row.model_type, row.sizes, "cuda" if cuda else "cpu", dtype)
        folder = work / f"row-{index}"
        folder.mkdir(parents=True, exist_ok=True)
        recipe = recipe_for(folder, model, work, row)
        plan_bytes, plan = planned(recipe, row)
        measured = measure(recipe, row, folder)
        results.append({"row": row.name, "plan_mib": plan_bytes / 2**20, "measured_mib": measured / 2**20,
                        "ratio": plan_bytes / measured, "parts": largest_parts(plan)})
        print(f"| {row.name} | {plan_bytes / 2**20:.0f} | {measured / 2**20:.0f} | {plan_bytes / measured:.2f} | "
              f"{results[-1]['parts']} |", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", help="Comma-separated row numbers (default: all).")
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep it.")
    args = parser.parse_args()
    chosen = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    work = args.keep or Path(tempfile.mkdtemp(prefix="plan-memory-"))
    print("| row | plan (MiB) | measured peak over baseline (MiB) | plan / measured | largest planned parts (MiB) |")
    print("|---|---|---|---|---|")
    measure_rows(chosen, work)


if __name__ == "__main__":
    main()
