"""DPO and SFT throughput on an MoE model: TRL as users run it, TRL at its best, and moetune, side by side.

Run: python -m benchmarks.dpo_bench [--shape mixtral|fine] [--rounds N] [--quick]   (both shapes, 3 rounds: about
35 minutes on a quiet 2-core CPU; --quick: a smoke test)
Needs ../shared/data (the hh-rlhf pairs). Writes benchmarks/results.md (not with --quick).

Two shapes (SHAPES), each a model built from a config with a byte-level BPE tokenizer trained on the data, LoRA on
attention and experts, fp32 on the CPU: a 30M-parameter Mixtral (8 experts, top-2, vocabulary 8,000), and the fine
shape, a Qwen3-MoE (128 experts, top-8, vocabulary padded to Qwen3's 151,936 rows) with long sequences, the memory
of an 8k-token SFT step, the experts and LM-head kernels and torch profiles besides. Every variant trains one epoch over the same pairs
(or conversations) in the same order, in its own process (so peak memory is its own) with a datasets cache of its
own (so nothing one run tokenized or cached speeds up another), variants interleaved, repeated; medians are
reported. Two variants show where the reference cache pays: two epochs, and a second run after a first one with
another beta. Throughput counts real tokens: the non-padding tokens of prompt+chosen and prompt+rejected
(what TRL logs as num_tokens), or of each conversation for SFT, over the wall time of the trainer's construction
(tokenizing, the reference pass when precomputed) and training; loading the model and data is not timed. MFU is
model FLOPs (per real token: 6N for DPO, the policy's forward and backward to activations plus the reference
forward; 4N for LoRA SFT; N the parameters a token uses, LM head included) over the fp32 matmul ceiling measured in
the same run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.parity import SAME_MATH, loss_and_gradients, relative_differences

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_FILES = ("helpful_base_test", "helpful_online_test", "helpful_rejection_sampled_test", "harmless_base_test")
RESULTS = Path(__file__).resolve().parent / "results.md"

# The shapes: a Mixtral-shaped model (8 experts, top-2, small vocabulary) and one shaped like today's MoEs (Qwen3-MoE:
# 128 experts, top-8, a narrow expert FFN, Qwen3's 151,936-token vocabulary), both shrunk to run on a CPU.
SHAPES = {
    "mixtral": {"model": dict(architecture="mixtral", hidden_size=256, intermediate_size=1024, num_layers=4,
                              num_heads=4, num_kv_heads=2, num_experts=8, experts_per_token=2, vocab_size=8000,
                              max_position_embeddings=2048),
                "batch": 8, "dpo_steps": 2, "sft_steps": 6, "repeats": 3, "max_length": 1024},
    "fine": {"model": dict(architecture="qwen3_moe", hidden_size=128, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, num_experts=128, experts_per_token=8, vocab_size=16000,
                           max_position_embeddings=8192),
             "embedding_rows": 151_936, "batch": 2, "dpo_steps": 2, "sft_steps": 2, "repeats": 3, "max_length": 512,
             "skip": ("moetune_dpo_second_run", "moetune_dpo_2_epochs", "moetune_dpo_2_epochs_no_cache")},
}
QUICK = {
    "mixtral": {"model": dict(architecture="mixtral", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                              num_kv_heads=2, num_experts=8, experts_per_token=2, vocab_size=1000,
                              max_position_embeddings=2048),
                "batch": 4, "dpo_steps": 1, "sft_steps": 1, "repeats": 1, "max_length": 1024},
    "fine": {"model": dict(architecture="qwen3_moe", hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4,
                           num_kv_heads=2, num_experts=64, experts_per_token=8, vocab_size=1000,
                           max_position_embeddings=8192),
             "embedding_rows": 151_936, "batch": 1, "dpo_steps": 1, "sft_steps": 1, "repeats": 1, "max_length": 1024,
             "skip": ("moetune_dpo_second_run", "moetune_dpo_2_epochs", "moetune_dpo_2_epochs_no_cache")},
}
# Long sequences at the fine shape: pairs whose prompt is a long conversation (earlier hh-rlhf transcripts put
# before the pair's own), one per step, cut at max_length; then the memory of one SFT step on one 8k-token
# conversation. Quick mode: short versions of both.
LONG = {"max_length": 4096, "history_chars": 11_000, "batch": 1, "dpo_steps": 1, "sft_steps": 1, "repeats": 1,
        "variants": ("trl_dpo", "trl_dpo_best", "moetune_dpo", "trl_sft", "trl_sft_packing", "moetune_sft")}
MEMORY = {"max_length": 8192, "history_chars": 40_000, "batch": 1, "dpo_steps": 1, "sft_steps": 1, "repeats": 1,
          "variants": ("trl_sft", "moetune_sft", "moetune_sft_full_head")}
QUICK_LONG = {**LONG, "max_length": 512, "history_chars": 200}
QUICK_MEMORY = {**MEMORY, "max_length": 1024, "history_chars": 4_500}

# name: (stage, what it is)
VARIANTS = {
    "trl_dpo": ("dpo", "TRL DPOTrainer as users run it (defaults; on a CPU fp32, use_cpu)"),
    "trl_dpo_best": ("dpo", "TRL DPOTrainer at its best (+ precompute_ref_log_probs, activation checkpointing off)"),
    "moetune_dpo": ("dpo", "moetune DPO (padding-free, prompt-shared, reference log-probs precomputed)"),
    "moetune_dpo_no_share": ("dpo", "moetune DPO, speed.share_prompt off"),
    "moetune_dpo_padded": ("dpo", "moetune DPO, speed.padding_free off"),
    "moetune_dpo_no_cache": ("dpo", "moetune DPO, speed.reference_cache off"),
    "moetune_dpo_trl_head": ("dpo", "moetune DPO, speed.tiled_lm_head off (TRL's log-prob kernel)"),
    "moetune_dpo_second_run": ("dpo", "moetune DPO, a second run (another beta) reusing the first's reference pass"),
    "moetune_dpo_2_epochs": ("dpo", "moetune DPO, 2 epochs"),
    "moetune_dpo_2_epochs_no_cache": ("dpo", "moetune DPO, 2 epochs, speed.reference_cache off"),
    "trl_sft": ("sft", "TRL SFTTrainer as users run it (defaults; on a CPU fp32, use_cpu)"),
    "trl_sft_packing": ("sft", "TRL SFTTrainer with packing (+ activation checkpointing off)"),
    "moetune_sft": ("sft", "moetune SFT (padding-free, LM head on assistant tokens, same batches as TRL's defaults)"),
    "moetune_sft_full_head": ("sft", "moetune SFT, speed.scored_lm_head off"),
    "moetune_sft_padded": ("sft", "moetune SFT, speed.padding_free off"),
    "moetune_sft_trl_head": ("sft", "moetune SFT, speed.tiled_lm_head off (TRL's log-prob kernel)"),
}

# The ablations: moetune's DPO with one lever off each, so the table shows what every lever adds.
LEVERS_OFF = {"moetune_dpo_no_share": {"share_prompt": False}, "moetune_dpo_padded": {"padding_free": False},
              "moetune_dpo_no_cache": {"reference_cache": False}, "moetune_dpo_2_epochs_no_cache": {"reference_cache": False},
              "moetune_sft_full_head": {"scored_lm_head": False}, "moetune_sft_padded": {"padding_free": False},
              "moetune_dpo_trl_head": {"tiled_lm_head": False}, "moetune_sft_trl_head": {"tiled_lm_head": False}}
EPOCHS = {"moetune_dpo_2_epochs": 2, "moetune_dpo_2_epochs_no_cache": 2}
# Variants timed as the second run of a sweep: an untimed first run with these dpo: settings precedes them.
FIRST_RUN_DPO = {"moetune_dpo_second_run": {"beta": 0.3}}
# The reference cache pays where the same reference pass comes back: (with cache, without), each against each.
CACHE_GAINS = {"one epoch": ("moetune_dpo", "moetune_dpo_no_cache"),
               "second run (a sweep over beta, a re-run)": ("moetune_dpo_second_run", "moetune_dpo_no_cache"),
               "two epochs": ("moetune_dpo_2_epochs", "moetune_dpo_2_epochs_no_cache")}


def bench_recipe(run_dir: Path, sizes: dict, data_files: list[Path]) -> dict:
    return {"run_dir": str(run_dir), "seed": 0,
            "model": {"init": {"router_aux_loss_coef": 0.02, **sizes["model"]},
                      "lora": {"targets": ["attention", "experts"], "r": 16, "alpha": 32, "stages": ["sft", "dpo"]}},
            "data": {"on_error": "skip", "test_size": 0.01, "sources": [
                {"format": "hh_rlhf", "path": str(path), "sft_from_chosen": True} for path in data_files]}}


def hh_files(data: Path = SHARED_DATA) -> list[Path]:
    """The hh-rlhf files the benchmark trains on, in `data` (the shared data folder, or a copy of it)."""
    return [data / "hh_rlhf" / f"{name}.jsonl" for name in HH_FILES]


def long_pairs(path: Path, history_chars: int, count: int = 12) -> Path:
    """hh-rlhf pairs whose prompt is a long conversation: earlier transcripts (prompt and chosen answer) of the
    same file, then the pair's own (short) prompt, so every pair runs to about `history_chars` characters before its
    answers. The whole prompt must fit in max_length: TRL drops pairs whose answers are cut off entirely."""
    rows = [json.loads(line) for line in (SHARED_DATA / "hh_rlhf" / "helpful_base_test.jsonl").open()][:2000]
    pairs = [row for row in rows if len(row["prompt"]) < 300][:count]
    out, source = [], 0
    for pair in pairs:
        history = ""
        while len(history) < history_chars:
            history += rows[source]["prompt"] + rows[source]["chosen"]
            source += 1
        out.append({**pair, "prompt": history + pair["prompt"]})
    path.write_text("".join(json.dumps(row) + "\n" for row in out))
    return path


# ---------------------------------------------------------------- one variant, in a child process

def trainer_inputs(variant: str, recipe, examples: int, callbacks: list) -> dict:
    """Model, tokenizer, the first `examples` rows of the prepared split and the LoRA config (loaded untimed)."""
    from finetune.modeling import adapters
    from finetune.modeling.loading import load_stage_model, load_tokenizer
    from finetune.training.data_splits import load_split

    kind = "preference" if VARIANTS[variant][0] == "dpo" else "sft"
    model = load_stage_model(recipe.model_source, "base")
    return dict(model=model, train_dataset=load_split(recipe.run_path / "data", kind, "train").select(range(examples)),
                processing_class=load_tokenizer(recipe.model_source),
                peft_config=adapters.peft_config(model, recipe.model.lora),
                callbacks=callbacks)


def trainer_for(variant: str, recipe, output_dir: Path, inputs: dict):
    """The trainer of a variant: TRL's as configured for it, or what moetune's stage builds."""
    import torch
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from finetune.training.packed_dpo import dpo_trainer
    from finetune.training.packed_sft import sft_trainer
    from finetune.training.trainer_config import trainer_config

    # TRL's own defaults (bf16, activation checkpointing) on a GPU; on a CPU they fail, so users turn them off.
    machine_defaults = {} if torch.cuda.is_available() else dict(use_cpu=True, bf16=False)
    trl_defaults = dict(output_dir=str(output_dir), report_to="none", save_strategy="no",
                        per_device_train_batch_size=recipe.dpo["per_device_train_batch_size"], seed=recipe.seed,
                        num_train_epochs=1, disable_tqdm=True, **machine_defaults,
                        **{key: recipe.dpo[key] for key in ("max_length",) if key in recipe.dpo})
    if variant == "trl_dpo":
        return DPOTrainer(args=DPOConfig(**trl_defaults), **inputs)
    if variant == "trl_dpo_best":
        return DPOTrainer(args=DPOConfig(**trl_defaults, precompute_ref_log_probs=True,
                                         gradient_checkpointing=False), **inputs)
    if variant == "trl_sft":
        return SFTTrainer(args=SFTConfig(**trl_defaults), **inputs)
    if variant == "trl_sft_packing":
        return SFTTrainer(args=SFTConfig(**trl_defaults, packing=True, gradient_checkpointing=False), **inputs)
    stage = VARIANTS[variant][0]
    make = dpo_trainer if stage == "dpo" else sft_trainer
    recipe.speed = dataclasses.replace(recipe.speed, **LEVERS_OFF.get(variant, {}))
    return make(recipe.speed, args=trainer_config(recipe.trainer_settings(stage), output_dir), **inputs)


def real_tokens(trainer, stage: str) -> int:
    """Non-padding tokens of the trained examples (every epoch), after TRL's truncation to max_length."""
    data, limit = trainer.train_dataset, trainer.args.max_length or 10**9
    if stage == "sft":
        per_epoch = sum(len(ids) for ids in data["input_ids"])
    else:
        per_epoch = sum(min(len(p) + len(c), limit) + min(len(p) + len(r), limit)
                        for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"]))
    return per_epoch * int(trainer.args.num_train_epochs)


class PeakRss:
    """The highest resident memory of this process while the block runs, sampled every few milliseconds."""

    def __enter__(self):
        import threading

        self.before = self.peak = rss_mib()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(spec: dict) -> dict:
    from transformers import TrainerCallback

    from finetune.modeling.loading import seed_everything
    from finetune.config.parsing import parse_recipe

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    recipe = parse_recipe(spec["recipe"], "<bench>")
    recipe.dpo["num_train_epochs"] = EPOCHS.get(spec["variant"], 1)
    stage = VARIANTS[spec["variant"]][0]
    seed_everything(0)
    timer = StepTimer()
    inputs = trainer_inputs(spec["variant"], recipe, spec["examples"], [timer])
    profile = None
    with tempfile.TemporaryDirectory() as output_dir:
        start = time.perf_counter()
        trainer = trainer_for(spec["variant"], recipe, Path(output_dir), inputs)
        if spec.get("first_run"):  # only what the second run reuses: the reference pass
            return {}
        with PeakRss() as memory, profiled(spec.get("profile")) as profiler:
            trainer.train()
        seconds = time.perf_counter() - start
        if profiler is not None:
            profile = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50)
    return {"variant": spec["variant"], "seconds": seconds, "tokens": real_tokens(trainer, stage),
            "step_s": statistics.median(timer.times), "steps": len(timer.times),
            "peak_mib": peak_mib(),
            "train_peak_mib": memory.peak, "train_added_mib": memory.peak - memory.before, "profile": profile}


def peak_mib() -> float:
    """The process's peak memory: on a GPU the most torch allocated there, else the peak resident set."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def profiled(on: bool):
    """torch's profiler around training (CPU operators, self time), or nothing."""
    import contextlib

    import torch

    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if on else contextlib.nullcontext()


def measure(spec: dict) -> dict:
    """One variant in fresh processes, with a datasets cache of its own: nothing one run tokenized or cached reaches
    another, except the untimed first run of a FIRST_RUN_DPO variant (same data and model, other dpo: settings)."""
    with tempfile.TemporaryDirectory() as cache:
        if spec["variant"] in FIRST_RUN_DPO:
            first = copy.deepcopy(spec)
            first["recipe"]["dpo"] = {**first["recipe"]["dpo"], **FIRST_RUN_DPO[spec["variant"]]}
            in_child({**first, "first_run": True}, cache)
        return in_child(spec, cache)


def in_child(spec: dict, datasets_cache: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "benchmarks.dpo_bench", "--child", json.dumps(spec)],
                            capture_output=True, text=True, env={**os.environ, "HF_DATASETS_CACHE": datasets_cache})
    if result.returncode != 0:
        sys.exit(f"{spec['variant']} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the parent: setup, interleaved runs, report

def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """fp32 matmul throughput through torch on this machine's threads: the ceiling MFU is quoted against."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def flops_per_token(config) -> float:
    """N: the parameters one token uses (attention, router, top-k experts, LM head), times 2 for a forward."""
    hidden, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim
    experts_ffn = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    experts = config.num_experts_per_tok * 3 * hidden * experts_ffn + hidden * num_experts
    return 2 * (config.num_hidden_layers * (attention + experts) + config.vocab_size * hidden)


def same_math_check(recipe, batch_size: int) -> tuple[float, float]:
    """moetune's DPO loss and gradients against TRL's on the same batch of real pairs (LoRA moved off zero)."""
    import torch
    from trl import DPOTrainer

    from finetune.modeling import adapters
    from finetune.modeling.loading import load_stage_model, load_tokenizer
    from finetune.training.packed_dpo import dpo_trainer
    from finetune.training.data_splits import load_split
    from finetune.training.trainer_config import trainer_config

    base, tokenizer = load_stage_model(recipe.model_source, "base"), load_tokenizer(recipe.model_source)
    pairs = load_split(recipe.run_path / "data", "preference", "train").select(range(batch_size))
    results = []
    with tempfile.TemporaryDirectory() as folder:
        config = trainer_config(recipe.trainer_settings("dpo"), Path(folder))
        config.precompute_ref_log_probs = False
        for make in (lambda **kw: DPOTrainer(**kw), lambda **kw: dpo_trainer(recipe.speed, **kw)):
            model = copy.deepcopy(base)
            trainer = make(model=model, args=config, train_dataset=pairs, processing_class=tokenizer,
                           peft_config=adapters.peft_config(model, recipe.model.lora))
            torch.manual_seed(1)
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name:
                    param.data.normal_(0, 0.02)
            results.append(loss_and_gradients(trainer, [trainer.train_dataset[i] for i in range(batch_size)]))
    return relative_differences(*results)


def prepare(folder: Path, sizes: dict, data_files: list[Path]) -> dict:
    from finetune.stages.prepare import run as prep
    from finetune.registry import BY_NAME
    from finetune.modeling.loading import load_stage_model
    from finetune.config.parsing import parse_recipe

    raw = bench_recipe(folder / "run", sizes, data_files)
    raw["dpo"] = raw["sft"] = {"per_device_train_batch_size": sizes["batch"], "num_train_epochs": 1,
                               "disable_tqdm": True, **({"max_length": sizes["max_length"]} if "max_length" in sizes else {})}
    recipe = parse_recipe(copy.deepcopy(raw), "<bench>")
    prep(recipe)
    base_folder = BY_NAME["base"].run(recipe)
    if sizes.get("embedding_rows"):
        model = load_stage_model(recipe.model_source, "base")
        model.resize_token_embeddings(sizes["embedding_rows"], mean_resizing=False)
        model.save_pretrained(base_folder)
    return raw


BASELINES = {"dpo": ("trl_dpo", "trl_dpo_best"), "sft": ("trl_sft", "trl_sft_packing")}


def summarize(results: dict[str, list[dict]], ceilings: list[float], flops: float) -> list[dict]:
    """Medians per variant; speed-ups are medians of each round's ratio (variants of a round ran minutes apart,
    rounds may differ more: other jobs on the machine come and go)."""
    ceiling = statistics.median(ceilings)
    throughput = {variant: [r["tokens"] / r["seconds"] for r in runs] for variant, runs in results.items()}
    rows = []
    for variant, runs in results.items():
        stage = VARIANTS[variant][0]
        # forward 2N (flops); DPO 6N, LoRA SFT 4N; per token/s, as a fraction of the ceiling
        mfu_per_token_s = flops * (3 if stage == "dpo" else 2) / (ceiling * 1e9)
        speedups = [median_ratio(throughput[variant], throughput[baseline]) for baseline in BASELINES[stage]]
        rows.append({"variant": variant, "stage": stage, "tokens_per_s": statistics.median(throughput[variant]),
                     "speedups": speedups, "step_s": statistics.median(r["step_s"] for r in runs),
                     "steps": runs[0]["steps"], "tokens": runs[0]["tokens"],
                     "peak_mib": statistics.median(r["peak_mib"] for r in runs),
                     "mfu": statistics.median(throughput[variant]) * mfu_per_token_s,
                     "step_mfu": statistics.median(r["tokens"] / r["steps"] / r["step_s"] for r in runs)
                     * mfu_per_token_s})
    return rows


def median_ratio(runs: list[float], baseline_runs: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(runs, baseline_runs))


def table(rows: list[dict], memory: str = "peak RSS (MiB)") -> str:
    lines = [f"| variant | real tokens/s | x TRL defaults | x TRL best | step time (s) | steps | {memory} | MFU | "
             "MFU of the steps |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        # TRL's rows are one-epoch first runs: only those of moetune compare with them.
        alike = row["variant"] not in EPOCHS and row["variant"] not in FIRST_RUN_DPO
        speedups = " | ".join(f"{x:.2f}" if alike else "-" for x in row["speedups"])
        lines.append(f"| {VARIANTS[row['variant']][1]} | {row['tokens_per_s']:,.0f} | {speedups} | "
                     f"{row['step_s']:.2f} | {row['steps']} | {row['peak_mib']:,.0f} | {100 * row['mfu']:.1f}% | "
                     f"{100 * row['step_mfu']:.1f}% |")
    return "\n".join(lines)


def cache_gains(results: dict[str, list[dict]]) -> str:
    """What speed.reference_cache adds where the reference pass is needed again, and where it is not."""
    throughput = {variant: [r["tokens"] / r["seconds"] for r in runs] for variant, runs in results.items()}
    lines = ["| the same reference pass needed | tokens/s, cache on | cache off | x |", "|---|---|---|---|"]
    for case, (cached, uncached) in CACHE_GAINS.items():
        if cached not in results:  # a shape that skips the reuse rows (they measure the cache, not the shape)
            continue
        lines.append(f"| {case} | {statistics.median(throughput[cached]):,.0f} | "
                     f"{statistics.median(throughput[uncached]):,.0f} | "
                     f"{median_ratio(throughput[cached], throughput[uncached]):.2f} |")
    return "\n".join(lines)


def rounds(results: dict[str, list[dict]]) -> str:
    """Every run's tokens/s, round by round, so the noise is visible."""
    lines = ["| variant | " + " | ".join(f"round {i + 1}" for i in range(len(next(iter(results.values()))))) + " |",
             "|---|" + "---|" * len(next(iter(results.values())))]
    for variant, runs in results.items():
        lines.append(f"| {variant} | " + " | ".join(f"{r['tokens'] / r['seconds']:,.0f}" for r in runs) + " |")
    return "\n".join(lines)


def parameters(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).num_parameters()


def machine() -> str:
    import torch
    import transformers
    import trl

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, trl {trl.__version__}")


def main(quick: bool, rounds: int | None = None, shapes: tuple[str, ...] = tuple(SHAPES)) -> None:
    if not (SHARED_DATA / "hh_rlhf").is_dir():
        sys.exit(f"{SHARED_DATA}/hh_rlhf is missing: the benchmark reads the shared hh-rlhf files.")
    for shape in shapes:
        report = bench_shape(shape, quick, rounds)
        print(report)
        if not quick:
            write_section(shape, report)
            print(f"written to {RESULTS}")


def bench_shape(shape: str, quick: bool, rounds: int | None) -> str:
    from transformers import AutoConfig

    from finetune.config.parsing import parse_recipe

    sizes = {**(QUICK if quick else SHAPES)[shape], **({"repeats": rounds} if rounds else {})}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        raw = prepare(Path(folder), sizes, hh_files())
        config = AutoConfig.from_pretrained(Path(raw["run_dir"]) / "base")
        extras = fine_shape_extras(Path(folder), raw, sizes, quick, config) if shape == "fine" else []
        results, ceilings = run_rounds(raw, sizes, [variant for variant in VARIANTS if variant not in sizes.get("skip", ())])
        loss_diff, grad_diff = same_math_check(parse_recipe(copy.deepcopy(raw), "<bench>"), sizes["batch"])
    rows = summarize(results, ceilings, flops_per_token(config))
    return render(shape, rows, results, ceilings, config, sizes, loss_diff, grad_diff,
                  time.perf_counter() - started, extras)


def run_rounds(raw: dict, sizes: dict, variants: list[str]) -> tuple[dict[str, list[dict]], list[float]]:
    """Every variant once per round, the order rotated each round (no variant always first)."""
    results, ceilings = {variant: [] for variant in variants}, []
    for repeat in range(sizes["repeats"]):
        ceilings.append(matmul_gflops())
        shift = repeat % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            steps = sizes["dpo_steps" if VARIANTS[variant][0] == "dpo" else "sft_steps"]
            result = measure({"variant": variant, "recipe": raw, "examples": steps * sizes["batch"]})
            results[variant].append(result)
            print(f"[{repeat + 1}/{sizes['repeats']}] {variant}: {result['tokens'] / result['seconds']:,.0f} "
                  f"tokens/s, step {result['step_s']:.2f}s, peak {result['peak_mib']:,.0f} MiB, training added "
                  f"{result['train_added_mib']:,.0f} MiB", flush=True)
    return results, ceilings


def fine_shape_extras(folder: Path, raw: dict, sizes: dict, quick: bool, config) -> list[str]:
    """At the fine shape: the experts kernels, long sequences, the memory of an 8k-token SFT step, and where
    moetune's time goes (torch's profiler)."""
    from benchmarks import experts_bench, lm_head_bench

    lines = ["## Experts kernels at this shape", "", experts_bench.compare(config, quick), "",
             "## LM-head log-prob kernels at this shape (speed.tiled_lm_head)", "",
             lm_head_bench.compare(config.hidden_size, config.vocab_size, quick), ""]
    for name, case in (("long", QUICK_LONG if quick else LONG), ("memory", QUICK_MEMORY if quick else MEMORY)):
        case_sizes = {**sizes, **{k: v for k, v in case.items() if k != "variants"}}
        data = long_pairs(folder / f"{name}.jsonl", case["history_chars"])
        case_raw = prepare(folder / name, case_sizes, [data])
        results, ceilings = run_rounds(case_raw, case_sizes, list(case["variants"]))
        if name == "long":
            lines += [f"## Long sequences: pairs and conversations cut at {case['max_length']} tokens, one per step",
                      "", table(summarize(results, ceilings, flops_per_token(config))), ""]
        else:
            lines += [memory_table(results, case["max_length"]), ""]
    lines += ["## Where moetune's time goes (torch profiler, one run each, operators by self CPU time)", ""]
    for variant in ("moetune_dpo", "moetune_sft"):
        steps = sizes["dpo_steps" if VARIANTS[variant][0] == "dpo" else "sft_steps"]
        with tempfile.TemporaryDirectory() as cache:
            result = in_child({"variant": variant, "recipe": raw, "examples": steps * sizes["batch"],
                               "profile": True}, cache)
        lines += [f"{VARIANTS[variant][1]}:", "", "```", result["profile"].strip(), "```", ""]
    return lines


def memory_table(results: dict[str, list[dict]], length: int) -> str:
    trl = statistics.median(r["train_added_mib"] for r in results["trl_sft"])
    lines = [f"## Memory of one SFT step on one {length}-token conversation (vocabulary 151,936)", "",
             "| variant | RSS added by training (MiB) | x TRL | peak RSS while training (MiB) |", "|---|---|---|---|"]
    for variant, runs in results.items():
        added = statistics.median(r["train_added_mib"] for r in runs)
        lines.append(f"| {VARIANTS[variant][1]} | {added:,.0f} | {added / trl:.2f} | "
                     f"{statistics.median(r['train_peak_mib'] for r in runs):,.0f} |")
    lines += ["", "RSS added by training: the highest resident memory while `trainer.train()` ran (sampled every 5 "
              "ms) minus the resident memory just before it (model, data and trainer loaded)."]
    return "\n".join(lines)


def write_section(shape: str, report: str) -> None:
    """Replace this shape's section of benchmarks/results.md (the other shape's stays)."""
    start, end = f"<!-- shape: {shape} -->", f"<!-- end of shape: {shape} -->"
    text = RESULTS.read_text() if RESULTS.exists() else ""
    block = f"{start}\n{report}\n{end}"
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text.lstrip())


def render(shape, rows, results, ceilings, config, sizes, loss_diff, grad_diff, seconds, extras) -> str:
    ok = "equal" if loss_diff < SAME_MATH["float32"][0] and grad_diff < SAME_MATH["float32"][1] else "NOT EQUAL"
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    experts_ffn = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    vocabulary = (f"vocabulary {config.vocab_size} (a {sizes['model']['vocab_size']}-token byte-level BPE trained on "
                  f"the data, embedding and LM head padded to {config.vocab_size} rows as Qwen3's are)"
                  if sizes.get("embedding_rows") else f"vocabulary {config.vocab_size} (byte-level BPE trained on the data)")
    return "\n".join([
        f"# DPO and SFT throughput: TRL vs moetune, {shape} shape",
        "",
        f"Date: {time.strftime('%Y-%m-%d', time.gmtime())}. Machine: {machine()}. This machine is shared and noisy "
        "(other jobs come and go): only ratios measured side by side in one run mean much; variants ran "
        f"interleaved (rounds rotate the order), {sizes['repeats']} times each, medians shown. Total benchmark time {seconds / 60:.1f} min.",
        "No GPU was lent to the session that ran this; the GPU run is still to do.",
        f"fp32 matmul ceiling (2048^3, measured before each round): median {statistics.median(ceilings):.0f} GFLOP/s "
        f"({', '.join(f'{c:.0f}' for c in ceilings)}).",
        "",
        f"Model: {config.model_type} from a config, {parameters(config) / 1e6:.1f}M parameters, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{num_experts} experts top-{config.num_experts_per_tok}, expert FFN {experts_ffn}, "
        f"{vocabulary}; LoRA r=16 on attention and experts; "
        f"fp32. Data: the hh-rlhf pairs of ../shared/data (chosen conversations for SFT), chat-templated, "
        f"max length {sizes['max_length']}, batches of {sizes['batch']}, {sizes['dpo_steps']} DPO and {sizes['sft_steps']} SFT steps of "
        "the same examples in the same order for every variant.",
        "",
        table(rows),
        "",
        "Speed-ups are medians of the per-round ratios. The rows with one speed lever off each show what that lever "
        "adds to moetune's DPO.",
        "",
        "The reference cache (speed.reference_cache) computes the reference log-probs in one inference pass before "
        "training, which costs about what the reference forwards inside one epoch's steps cost. It pays where the "
        "same pass is needed again: a second epoch, or a second run on the same model and data (a sweep over beta or "
        "the learning rate, a re-run, a run resumed after a crash), which finds the pass cached:",
        "",
        cache_gains(results),
        "",
        "Every run's real tokens/s:",
        "",
        rounds(results),
        "",
        f"Same math: on one batch of {sizes['batch']} real pairs, moetune's DPO loss differs from TRL's by "
        f"{loss_diff:.1e} (relative) and its worst adapter gradient by {grad_diff:.1e} (relative to that gradient's "
        f"largest entry): {ok} at {SAME_MATH['float32'][0]:.0e} and {SAME_MATH['float32'][1]:.0e}.",
        "",
        "Real tokens: the non-padding tokens of prompt+chosen and prompt+rejected (TRL's num_tokens) or of each "
        "conversation, over the wall time of building the trainer (tokenizing; the reference pass where "
        "precomputed) and training (loading model and data not timed). MFU: 6N FLOPs per real DPO token, 4N per SFT token (N: parameters a token "
        "uses, LM head included) over the matmul ceiling. The FLOPs are those of the DPO math on TRL's real tokens, so "
        "moetune's figure includes the work it avoids (each prompt once, the LM head on completion tokens only): an "
        "effective MFU. MFU of the steps: the same FLOPs over the median training step alone (tokens per step over "
        "step time), without the fixed costs of a short run (trainer construction, tokenizing, the reference pass, "
        f"the Trainer's start-up) that a real run spreads over thousands of steps. Reproduce: `make bench` or `python -m benchmarks.dpo_bench --shape {shape}`.",
        "",
        *extras,
    ])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one step, one round: a smoke test")
    parser.add_argument("--rounds", type=int, help="rounds of every variant (default 3; 1 with --quick): more rounds, "
                        "steadier medians on a noisy machine, about 4 minutes each per shape on a quiet 2-core CPU")
    parser.add_argument("--shape", choices=list(SHAPES), help="one shape only (default: all): mixtral (8 experts, "
                        "top-2, vocabulary 8,000) or fine (128 experts, top-8, vocabulary 151,936, long sequences)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        print(json.dumps(run_variant(json.loads(arguments.child))))
    else:
        main(arguments.quick, arguments.rounds, (arguments.shape,) if arguments.shape else tuple(SHAPES))
