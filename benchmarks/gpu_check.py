"""The GPU check: one prepared script that runs moetune's CUDA code paths and measures them, in at most 8 minutes
on one H200, with a one-line verdict per part.

Parts, each in a process of its own under a time budget, so one that fails or runs out of time still lets the
others report (pipeline, conformance and plan_memory, which time nothing, side by side; then the others one at a
time):
  pipeline     `moetune run recipes/tiny-moe.yaml` with the machine's defaults (on a GPU: bf16, activation
               checkpointing) into a temporary run_dir; verdict: scores base < SFT < DPO.
  conformance  the tests marked `conformance` (and every test in tests/test_conformance*.py, tests/test_famil*.py)
               with MOETUNE_TEST_DEVICE=cuda: tiny MoE models of each family on the GPU in bf16.
  plan_memory  `moetune plan`'s peak against the measured one, through the stage a user runs (`moetune sft`, one
               step, in a process of its own: benchmarks/plan_memory.py): a Mixtral-8x7B-width QLoRA (NF4 experts,
               LoRA on attention and experts; its real widths and vocabulary, 2 layers) and an OLMoE-1B-7B-shaped
               full fine-tune (2 of its 16 layers); on a GPU torch.cuda.max_memory_allocated against the plan less
               its overhead row (the CUDA context and allocator slack, outside torch's counters), on a CPU the
               resident peak over the post-import baseline; verdict: every row within 20%.
  qlora        a Mixtral-8x7B-shaped model (its real widths and vocabulary, 2 decoder layers), one LoRA step of
               (a) NF4 experts (moetune), (b) LoRA on the bf16 base, (c) stock bitsandbytes 4-bit, each in its own
               process (benchmarks/qlora_bench.py): peak torch.cuda.max_memory_allocated, a/b (goal <= 0.35), step
               times, and the NF4 kernels' share of a step (torch.profiler).
  speed        benchmarks/dpo_bench.py's variants (TRL as users run it, TRL at its best, moetune, each lever off; SFT
               likewise) on an OLMoE-1B-7B-shaped model with 4 layers in bf16, batches of 8 hh-rlhf pairs of up to
               2,048 tokens: real tokens/s, speed-ups, peak memory, MFU against the GPU's bf16 dense peak.
  equality     the packed, prompt-shared DPO batch against TRL's padded one on the same model and pairs: loss and
               adapter gradients within the stated tolerance of the dtype (bf16 on a GPU).
  expert_parallel  `moetune run --accelerate ep --num-processes 2 model.expert_parallel=2` (experts split across
               2 GPUs, NCCL; with --cpu 2 gloo processes), full SFT then full DPO, and LoRA SFT then LoRA DPO on
               attention and experts (--cpu: LoRA only), in fp32, against one process with the same global batch;
               verdict: saved weights and adapters within the tolerance, and each process holding half of
               the routed experts' LoRA factor elements one process holds. Skipped, saying why, on fewer
               than 2 GPUs (NCCL refuses two processes on one GPU, and transformers applies no EP plan to one).
  serving      where vLLM / SGLang is importable: a `moetune export --format vllm` / `--format sglang` adapter
               served by it, prompt log-probs against transformers + PEFT (benchmarks/serving_check.py); each server
               not importable is reported as skipped (the part as SKIPPED when both are).

Writes results-gpu.md and results-gpu.json (every figure) to --out (default: benchmarks/; with --cpu a new
temporary folder). --cpu runs the same code at tiny sizes on the CPU, as `make test` does, so the check cannot rot
between GPU sessions: one conformance test (make test runs them all), the speed variants without the levers off,
and the verdicts that only mean something at GPU sizes (score order, memory ratio, speed-ups) reported as measured,
not judged.

The hh-rlhf pairs come from --data (default ../shared/data); a machine without it (the lent GPU machine gets only
the repository) reads the rows `make gpu-carry` copies into .gpu_data/ (benchmarks/gpu_carry.py), or falls back to
generated pairs (short ones: the figures then say so). benchmarks/GPU_RUN.md gives the command for the lent H200.

Run: python -m benchmarks.gpu_check [--cpu] [--data DIR] [--out DIR] [--parts pipeline,speed]   (make gpu-check)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
H200_BF16_DENSE_TFLOPS = 989  # NVIDIA's H200 SXM datasheet (the H100's), without sparsity
BF16_PEAKS = {"H200": H200_BF16_DENSE_TFLOPS, "H100": H200_BF16_DENSE_TFLOPS, "A100": 312}
# The comparisons of benchmarks/dpo_bench.py this check runs (the second-run and two-epoch variants are left out:
# they measure reuse of the reference cache, not the GPU). The CPU mode leaves out the levers too: same code, fewer
# processes.
SPEED_VARIANTS = ["trl_dpo", "trl_dpo_best", "moetune_dpo", "moetune_dpo_no_share", "moetune_dpo_padded",
                  "moetune_dpo_no_cache", "trl_sft", "trl_sft_packing", "moetune_sft"]
SPEED_VARIANTS_CPU = ["trl_dpo", "trl_dpo_best", "moetune_dpo", "trl_sft", "trl_sft_packing", "moetune_sft"]


def plan_rows(names: tuple[str, str], length: int, mixtral: dict, olmoe: dict) -> list[dict]:
    """The plan_memory part's rows (benchmarks/plan_memory.Row): one SFT step of a Mixtral QLoRA (NF4 experts, LoRA
    on attention and experts) of 2 sequences and of an OLMoE full fine-tune of 4, each model with 2 layers."""
    fixed = dict(num_hidden_layers=2, max_position_embeddings=4096)
    lora = {"targets": ["attention", "experts"], "r": 16, "alpha": 32}
    return [dict(name=names[0], stage="sft", model_type="mixtral", lora=lora, quantization={"bits": 4}, batch=2,
                 max_length=length, sizes={**mixtral, **fixed}),
            dict(name=names[1], stage="sft", model_type="olmoe", lora=None, quantization=None, batch=4,
                 max_length=length, sizes={**olmoe, **fixed})]


GPU_SIZES = {
    "pipeline": {"recipe_changes": {}, "judge": True},
    "conformance": {"pytest_args": []},
    "qlora": {"shape": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                            num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                            tie_word_embeddings=False),  # Mixtral-8x7B's widths, 2 of its 32 layers
              "batch": 2, "sequence": 1024, "warmup": 1, "judge": True},
    "speed": {"model": dict(architecture="olmoe", hidden_size=2048, intermediate_size=1024, num_layers=4,
                            num_heads=16, num_kv_heads=16, num_experts=64, experts_per_token=8, vocab_size=50304,
                            max_position_embeddings=4096),  # OLMoE-1B-7B's widths, 4 of its 16 layers
              "batch": 8, "dpo_steps": 6, "sft_steps": 6, "max_length": 2048, "variants": SPEED_VARIANTS,
              "judge": True},
    "plan_memory": {"rows": plan_rows(
        ("Mixtral-8x7B-width QLoRA SFT, 2 x 1k tokens", "OLMoE-1B-7B-shaped full SFT, 4 x 1k tokens"), 1024,
        dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
             num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, head_dim=128),  # Mixtral-8x7B's
        dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_attention_heads=16,
             num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, head_dim=128)),  # OLMoE-1B-7B's
        "tolerance": 0.2, "judge": True},
    "expert_parallel": {"steps": {"sft": 8, "dpo": 3}, "tolerance": 1e-4, "layouts": ["full", "lora"],
                        "data": {"sft": 300, "pairs": 100, "questions": 8}},
    # seconds; pipeline, conformance and plan_memory run side by side: at most 120 + 115 + 200 + 45 + 240 + 150 s =
    # 14.5 minutes in all (expert_parallel skips in seconds on one GPU, serving where neither vLLM nor SGLang is
    # importable; each that is starts an engine, hence 150 s)
    "budgets_s": {"pipeline": 110, "conformance": 90, "plan_memory": 120, "qlora": 115, "speed": 200, "equality": 45,
                  "expert_parallel": 240, "serving": 150},
}
CPU_SIZES = {
    # the data just covers the steps: DPO precomputes the reference log-probs of every training pair
    "pipeline": {"recipe_changes": {"data": {"sources": [{"format": "synthetic",
                                                          "options": {"sft": 64, "pairs": 24, "questions": 4}}]},
                                    "sft": {"max_steps": 4, "per_device_train_batch_size": 8, "logging_steps": 2},
                                    "dpo": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1},
                                    "eval": {"max_new_tokens": 4, "batch_size": 16}},
                 "judge": False},
    # `make test` runs the whole conformance selection on the CPU: here one test shows the part works
    "conformance": {"pytest_args": ["-k", "test_padding_free_sft"]},
    "qlora": {"shape": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                            tie_word_embeddings=False),
              "batch": 2, "sequence": 64, "warmup": 1, "judge": False},
    "speed": {"model": dict(architecture="olmoe", hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=4, num_experts=8, experts_per_token=2, vocab_size=1000,
                            max_position_embeddings=2048),
              "batch": 2, "dpo_steps": 1, "sft_steps": 1, "max_length": 1024, "variants": SPEED_VARIANTS_CPU,
              "judge": False},
    # the same two kinds of model, narrower (dims multiples of 64)
    "plan_memory": {"rows": plan_rows(
        ("Mixtral-like QLoRA SFT, 2 x 512 tokens", "OLMoE-like full SFT, 4 x 512 tokens"), 512,
        dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             num_local_experts=4, num_experts_per_tok=2, head_dim=64),
        dict(vocab_size=1024, hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
             num_experts=16, num_experts_per_tok=4, head_dim=64)),
        # not judged: at these sizes the libraries a stage imports after the baseline (bitsandbytes for QLoRA: ~0.1
        # GiB) outweigh what the plan counts
        "tolerance": 0.2, "judge": False},
    # LoRA only: its runs exercise the part's code; full fine-tuning's comparison is tests/test_expert_parallel.py's
    "expert_parallel": {"steps": {"sft": 4, "dpo": 2}, "tolerance": 1e-5, "layouts": ["lora"],
                        "data": {"sft": 80, "pairs": 40, "questions": 4}},  # 2 x 8 per step
    # seconds: only against hangs (on a quiet 2-core machine the parts take a minute or less each)
    "budgets_s": {"pipeline": 600, "conformance": 300, "qlora": 400, "speed": 600, "equality": 300,
                  "plan_memory": 400, "expert_parallel": 600, "serving": 120},
}


# ---------------------------------------------------------------- the parts (each runs in a child process)

def part_pipeline(sizes: dict, data: Path, work: Path) -> dict:
    import yaml

    from finetune.cli import main as moetune
    from finetune.config.parsing import load_recipe
    from finetune.training.trainer_config import device_defaults

    sizes = sizes["pipeline"]
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-moe.yaml").read_text())
    for section, changes in sizes["recipe_changes"].items():
        raw[section] = {**raw[section], **changes}
    raw["run_dir"] = str(work / "tiny-moe")
    recipe_file = work / "tiny-moe.yaml"
    recipe_file.write_text(yaml.safe_dump(raw))
    defaults = device_defaults(load_recipe(recipe_file, []).model.dtype)
    start = time.perf_counter()
    code = moetune(["run", str(recipe_file)])
    seconds = time.perf_counter() - start
    if code != 0:
        return {"ok": False, "verdict": f"`moetune run` exited with {code}", "figures": {"defaults": defaults}}
    models = json.loads((work / "tiny-moe" / "eval" / "scores.json").read_text())["models"]
    overall = {name: models[name]["overall"] for name in ("base", "sft", "dpo")}
    ordered = overall["base"] < overall["sft"] < overall["dpo"]
    setting = ", ".join(name for name, on in (("bf16", defaults["bf16"]), ("fp16", defaults["fp16"]),
                                              ("activation checkpointing", defaults["activation_checkpointing"])) if on)
    scores = f"base {overall['base']:.2f}, SFT {overall['sft']:.2f}, DPO {overall['dpo']:.2f}"
    return {"ok": ordered if sizes["judge"] else None,
            "verdict": f"scores {scores} ({'in order' if ordered else 'NOT base < SFT < DPO'}) with "
                       f"{setting or 'fp32 on the CPU'}, {seconds:.0f} s",
            "figures": {"overall": overall, "scores": models, "defaults": defaults, "seconds": seconds}}


def part_conformance(sizes: dict, data: Path, work: Path) -> dict:
    import torch

    from tests.helpers.on_device import CONFORMANCE_FILES

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = work / "conformance.xml"
    # Only the files that hold conformance tests: another test module that cannot import on a GPU machine's packages
    # must not stop them.
    files = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "tests").glob("test_*.py"))
             if path.name.startswith(CONFORMANCE_FILES) or "mark.conformance" in path.read_text()]
    command = [sys.executable, "-m", "pytest", "-q", "-m", "conformance", "-p", "no:cacheprovider",
               f"--junitxml={report}", *sizes["conformance"]["pytest_args"], *files]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "MOETUNE_TEST_DEVICE": device})
    print(result.stdout[-6000:], result.stderr[-2000:], sep="\n")
    if not report.is_file():
        return {"ok": False, "verdict": f"pytest wrote no report (exit {result.returncode})", "figures": {}}
    counts, failed = junit_counts(report)
    ok = result.returncode == 0 and counts["passed"] > 0
    return {"ok": ok, "verdict": f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
                                 f"on {device} in {'bf16' if device == 'cuda' else 'fp32'}"
                                 + (f"; failed: {', '.join(failed[:5])}" if failed else ""),
            "figures": {**counts, "failed_tests": failed, "device": device}}


def junit_counts(report: Path) -> tuple[dict, list[str]]:
    counts, failed = {"passed": 0, "failed": 0, "skipped": 0}, []
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        key = {"failure": "failed", "error": "failed"}.get(outcome, outcome)
        counts[key] += 1
        if key == "failed":
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return counts, failed


def part_qlora(sizes: dict, data: Path, work: Path) -> dict:
    from benchmarks import qlora_bench

    sizes = sizes["qlora"]
    folder = work / "mixtral"
    counts = qlora_bench.build_model(folder, sizes["shape"])
    options = {key: sizes[key] for key in ("batch", "sequence", "warmup")}
    runs = {variant: qlora_bench.run_child(variant, folder, **options, profile=variant == "expert_nf4")
            for variant in qlora_bench.VARIANTS}
    shutil.rmtree(folder)
    peak_ratio = runs["expert_nf4"]["step_peak_mib"] / runs["full_precision"]["step_peak_mib"]
    model_ratio = runs["expert_nf4"]["model_mib"] / runs["full_precision"]["model_mib"]
    figures = {"parameters": counts, "runs": runs, "peak_ratio_a_b": peak_ratio, "model_ratio_a_b": model_ratio,
               "nf4_share": runs["expert_nf4"]["nf4_share"], **options}
    peaks = ", ".join(f"({letter}) {runs[v]['step_peak_mib'] / 1024:.2f} GiB in {runs[v]['step_s']:.2f} s"
                      for letter, v in zip("abc", qlora_bench.VARIANTS))
    return {"ok": peak_ratio <= 0.35 if sizes["judge"] else None,
            "verdict": f"{counts['total'] / 1e6:,.0f}M parameters; peak in a LoRA step {peaks}; a/b {peak_ratio:.2f} "
                       f"(goal <= 0.35; model alone {model_ratio:.2f}); NF4 kernels "
                       f"{100 * runs['expert_nf4']['nf4_share']:.0f}% of (a)'s step",
            "figures": figures}


def part_speed(sizes: dict, data: Path, work: Path) -> dict:
    from transformers import AutoConfig

    from benchmarks import dpo_bench

    sizes = sizes["speed"]
    raw, source = prepared_hh(sizes, data, work)
    config = AutoConfig.from_pretrained(Path(raw["run_dir"]) / "base")
    results = {}
    for variant in sizes["variants"]:
        steps = sizes["dpo_steps" if dpo_bench.VARIANTS[variant][0] == "dpo" else "sft_steps"]
        results[variant] = [dpo_bench.measure({"variant": variant, "recipe": raw, "examples": steps * sizes["batch"]})]
        print(f"{variant}: {results[variant][0]}", flush=True)
    ceiling = compute_ceiling()
    rows = dpo_bench.summarize(results, [ceiling["gflops"]], dpo_bench.flops_per_token(config))
    by_variant = {row["variant"]: row for row in rows}
    dpo, sft = by_variant["moetune_dpo"], by_variant["moetune_sft"]
    faster = min(dpo["speedups"] + sft["speedups"]) > 1
    verdict = (f"moetune DPO {dpo['tokens_per_s']:,.0f} tokens/s = {dpo['speedups'][0]:.2f}x TRL as users run it, "
               f"{dpo['speedups'][1]:.2f}x TRL at its best; SFT {sft['speedups'][0]:.2f}x / {sft['speedups'][1]:.2f}x; "
               f"MFU {100 * dpo['mfu']:.1f}% ({ceiling['name']}); {source}")
    figures = {"rows": rows, "runs": results, "ceiling": ceiling, "data": source,
               "parameters": dpo_bench.parameters(config), "vocab_size": config.vocab_size,
               "memory_label": "peak CUDA allocated (MiB)" if ceiling["gpu"] else "peak RSS (MiB)",
               **{key: sizes[key] for key in ("batch", "dpo_steps", "sft_steps", "max_length")}}
    return {"ok": faster if sizes["judge"] else None, "verdict": verdict, "figures": figures}


def part_equality(sizes: dict, data: Path, work: Path) -> dict:
    import torch

    from benchmarks import dpo_bench
    from finetune.modeling.loading import resolve_dtype
    from finetune.config.parsing import parse_recipe
    from tests.helpers.parity import SAME_MATH

    sizes = sizes["speed"]  # the speed part's model and pairs
    raw, source = prepared_hh(sizes, data, work)
    dtype = str(resolve_dtype("auto")).split(".")[-1]
    loss, gradients = dpo_bench.same_math_check(parse_recipe(copy.deepcopy(raw), "<gpu-check>"), sizes["batch"])
    tolerance = dict(zip(("loss", "gradients"), SAME_MATH[dtype]))
    ok = loss <= tolerance["loss"] and gradients <= tolerance["gradients"]
    where = "cuda" if torch.cuda.is_available() else "cpu"
    return {"ok": ok, "verdict": f"{sizes['batch']} pairs on {where} in {dtype}: loss differs by {loss:.1e} (tolerance "
                                 f"{tolerance['loss']:.0e}), worst adapter gradient by {gradients:.1e} (tolerance "
                                 f"{tolerance['gradients']:.0e}), relative; {source}",
            "figures": {"loss_difference": loss, "gradient_difference": gradients, "dtype": dtype,
                        "tolerance": tolerance, "pairs": sizes["batch"]}}


def part_plan_memory(sizes: dict, data: Path, work: Path) -> dict:
    import torch

    from benchmarks import plan_memory

    sizes, cuda = sizes["plan_memory"], torch.cuda.is_available()
    rows = [plan_memory.Row(**row) for row in sizes["rows"]]
    dtype = torch.bfloat16 if cuda else torch.float32  # moetune's default dtype on each (model.dtype auto)
    results = plan_memory.measure_rows(rows, work / "plan-memory", cuda=cuda, dtype=dtype)
    worst = max(abs(result["ratio"] - 1) for result in results)
    method = "torch.cuda.max_memory_allocated" if cuda else "peak RSS over the post-import baseline"
    found = "; ".join(f"{r['row']}: plan {r['plan_mib']:,.0f} MiB, measured {r['measured_mib']:,.0f} MiB "
                      f"({r['ratio']:.2f})" for r in results)
    return {"ok": worst <= sizes["tolerance"] if sizes["judge"] else None,
            "verdict": f"{found}; {method}, plan less its overhead row; worst {100 * worst:.0f}% off "
                       f"(tolerance {100 * sizes['tolerance']:.0f}%)",
            "figures": {"rows": results, "method": method, "tolerance": sizes["tolerance"]}}


def part_expert_parallel(sizes: dict, data: Path, work: Path) -> dict:
    import torch
    import yaml
    from safetensors.torch import load_file

    sizes, gpus = sizes["expert_parallel"], torch.cuda.device_count()
    if torch.cuda.is_available() and gpus < 2:
        return {"ok": None, "skipped": True, "figures": {"gpus": gpus},
                "verdict": f"needs 2 GPUs, this machine has {gpus}: one process per GPU (NCCL refuses two on one), "
                           f"and transformers applies no expert plan to a single process. The 2-process comparison "
                           f"runs on CPU processes (gloo) in tests/test_expert_parallel.py and in --cpu mode."}
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-moe.yaml").read_text())
    raw["data"]["sources"] = [{"format": "synthetic", "options": sizes["data"]}]
    raw["model"].update(dtype="float32", expert_parallel=2)
    for stage, steps in sizes["steps"].items():
        raw[stage].update(max_steps=steps, logging_steps=1, per_device_train_batch_size=8, router_aux_loss_coef=0)
    differences, held = {}, {}
    for port, layout in enumerate(sizes["layouts"], start=29677):
        raw["model"]["lora"] = lora = EP_LAYOUTS[layout]
        failed, printed = run_split_and_one(raw, work / f"ep-{layout}", port)
        if failed:
            return {"ok": False, "verdict": f"{layout}: {failed}", "figures": {"max_difference": differences}}
        saved = "adapter_model.safetensors" if lora else "model.safetensors"
        for stage in ("sft", "dpo"):
            a, b = (load_file(str(work / f"ep-{layout}" / name / stage / saved)) for name in ("split", "one"))
            differences[f"{layout} {stage}"] = max((a[key] - b[key]).abs().max().item() for key in a)
            if lora:  # what the split run's processes said they hold of the experts' factors, against one process's
                held[stage] = {"processes": held_factor_elements(printed),
                               "one_process": sum(b[key].numel() for key in b if ".mlp.experts." in key)}
    halved = all(sorted(h["processes"].values()) == [h["one_process"] // 2] * 2 for h in held.values())
    ok = max(differences.values()) <= sizes["tolerance"] and halved
    where = "2 GPUs (NCCL)" if torch.cuda.is_available() else "2 CPU processes (gloo)"
    found = ", ".join(f"{name} within {value:.1e}" for name, value in differences.items())
    split = "; ".join(f"{stage}: per process {sorted(h['processes'].values())} of the experts' LoRA factor elements, "
                      f"one process {h['one_process']}" for stage, h in held.items())
    return {"ok": ok, "verdict": f"experts split across {where} against one process, saved weights (full) or adapters "
                                 f"(lora: attention and experts): {found} (tolerance {sizes['tolerance']:.0e}); "
                                 f"{split} ({'halved' if halved else 'NOT halved'})",
            "figures": {"max_difference": differences, "tolerance": sizes["tolerance"], "gpus": gpus,
                        "expert_factor_elements": held}}


def held_factor_elements(printed: str) -> dict[str, int]:
    """{process: elements} from the lines a split LoRA stage prints (split_checkpoints.SplitModelCheckpoints)."""
    found = re.findall(r"process (\d+) holds (\d+) of the \d+ elements of the routed experts' LoRA factors", printed)
    return {process: int(elements) for process, elements in found}


# The expert_parallel part's layouts: full SFT then full DPO; LoRA SFT then LoRA DPO on the SFT adapter merged into
# the split weights (the experts' adapters applied by the process holding each expert).
EP_LAYOUTS = {"full": None, "lora": {"targets": ["attention", "experts"], "r": 16, "alpha": 32, "stages": ["sft", "dpo"]}}


def run_split_and_one(raw: dict, folder: Path, port: int) -> tuple[str | None, str]:
    """prep, then sft and dpo with the experts split over 2 processes, and on one process with the same global batch
    (2 accumulation steps); each in its run dir under `folder`. (The failure or None, what the split sft,dpo run
    printed.)"""
    import yaml

    printed = ""

    for name, launch in (("split", ["--accelerate", "ep", "--num-processes", "2", "--main-process-port", str(port)]),
                         ("one", ["sft.gradient_accumulation_steps=2", "dpo.gradient_accumulation_steps=2"])):
        folder.mkdir(parents=True, exist_ok=True)
        recipe = folder / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({**raw, "run_dir": str(folder / name)}))
        for stages in ("prep", "sft,dpo"):
            command = [sys.executable, "-m", "finetune", "run", str(recipe), "--stages", stages]
            result = subprocess.run(command + (launch if stages != "prep" else []), cwd=ROOT, capture_output=True,
                                    text=True)
            if result.returncode != 0:  # the launcher's last line only says a process failed: keep what it printed
                return f"{name} run: {(result.stderr or result.stdout).strip()[-3000:]}", printed
            printed += result.stdout if name == "split" else ""
    return None, printed


def part_serving(sizes: dict, data: Path, work: Path) -> dict:
    from benchmarks import serving_check

    return serving_check.check(work)


# Parts that time nothing: they run side by side, before the others run one at a time (plan_memory's figure is its
# own processes' peak: torch's allocator counts per process, and the GPU holds all three).
UNTIMED = ("pipeline", "conformance", "plan_memory")
PARTS = {"pipeline": part_pipeline, "conformance": part_conformance, "plan_memory": part_plan_memory,
         "qlora": part_qlora, "speed": part_speed, "equality": part_equality, "expert_parallel": part_expert_parallel,
         "serving": part_serving}


# ---------------------------------------------------------------- what the parts share

def prepared_hh(sizes: dict, data: Path, work: Path) -> tuple[dict, str]:
    """The speed benchmark's run folder (data prepared, base model built), shared by the parts that need it: the
    first builds it, the next finds its stages complete. Returns (raw recipe, where the pairs came from)."""
    from benchmarks import dpo_bench

    source = f"hh-rlhf pairs from {data}"
    if not (data / "hh_rlhf").is_dir():
        data, source = generated_hh(work / "generated"), "GENERATED pairs (no hh-rlhf at --data): short, synthetic"
    return dpo_bench.prepare(work / "hh", sizes, dpo_bench.hh_files(data)), source


def generated_hh(folder: Path) -> Path:
    """hh-rlhf-format files of the synthetic demo pairs, where the real ones are absent."""
    from finetune.core import synthetic_task

    def transcript(messages: list[dict]) -> str:
        return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)

    from benchmarks.dpo_bench import HH_FILES

    (folder / "hh_rlhf").mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(HH_FILES):
        with open(folder / "hh_rlhf" / f"{name}.jsonl", "w") as handle:
            for pair in synthetic_task.preference_pairs(500, seed):
                handle.write(json.dumps({"chosen": transcript(pair["prompt"] + pair["chosen"]),
                                         "rejected": transcript(pair["prompt"] + pair["rejected"])}) + "\n")
    return folder


def compute_ceiling() -> dict:
    """What MFU is quoted against: the GPU's bf16 dense peak from its datasheet (a bf16 matmul measured beside it), or
    on a CPU the fp32 matmul rate measured now."""
    import torch

    from benchmarks import dpo_bench

    if not torch.cuda.is_available():
        gflops = dpo_bench.matmul_gflops()
        return {"gpu": False, "gflops": gflops, "name": f"fp32 matmul measured, {gflops:.0f} GFLOP/s"}
    name = torch.cuda.get_device_name()
    measured = bf16_matmul_tflops()
    spec = next((peak for model, peak in BF16_PEAKS.items() if model in name), None)
    if spec is None:
        return {"gpu": True, "gflops": measured * 1e3, "measured_tflops": measured,
                "name": f"bf16 matmul measured on {name}, {measured:.0f} TFLOP/s (no datasheet figure known)"}
    return {"gpu": True, "gflops": spec * 1e3, "measured_tflops": measured, "spec_tflops": spec,
            "name": f"{name} bf16 dense datasheet peak {spec} TFLOP/s; an 8192^3 bf16 matmul measured {measured:.0f}"}


def bf16_matmul_tflops(size: int = 8192, repeats: int = 10) -> float:
    import torch

    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size ** 3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def run_part_here(name: str, sizes: dict, data: Path, work: Path) -> None:
    """The child: run one part, its result as JSON on the last line of stdout."""
    work.mkdir(parents=True, exist_ok=True)
    result = PARTS[name](sizes, data, work)
    print(json.dumps(result, default=str))


# ---------------------------------------------------------------- the parent: parts under time budgets, report

def start_part(name: str, mode: str, data: Path, work: Path) -> tuple[subprocess.Popen, float]:
    """One part in a process session of its own (so that it can be stopped with its children); its stderr to a log."""
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--child", name, "--mode", mode, "--data", str(data),
               "--work", str(work)]
    with open(work / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return process, time.perf_counter()


def finish_part(name: str, process: subprocess.Popen, started: float, budget: float, work: Path) -> dict:
    """Wait for a part until `budget` seconds after its start; past that, kill it and its children. The ends of its
    stderr (where an error is) and stdout (where test and training output is) are kept in the result."""
    try:
        stdout, _ = process.communicate(timeout=max(budget - (time.perf_counter() - started), 0.1))
        status = None
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, _ = process.communicate()
        status = "TIMEOUT"
    seconds = time.perf_counter() - started
    (work / f"{name}.out").write_text(stdout)
    tails = {"stderr_tail": tail(work / f"{name}.log"), "stdout_tail": tail(work / f"{name}.out")}
    if status == "TIMEOUT":
        return {"status": status, "verdict": f"ran past its budget of {budget:.0f} s", "seconds": seconds,
                "figures": {}, **tails}
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        last = (tails["stderr_tail"] or ["no output"])[-1]
        return {"status": "ERROR", "verdict": f"exit {process.returncode}: {last[:300]}", "seconds": seconds,
                "figures": {}, **tails}
    status = "SKIPPED" if result.get("skipped") else {True: "PASS", False: "FAIL", None: "MEASURED"}[result["ok"]]
    return {"status": status, "verdict": result["verdict"], "seconds": seconds, "figures": result["figures"],
            **(tails if status == "FAIL" else {})}


def tail(path: Path, lines: int = 40) -> list[str]:
    """The end of a part's output, kept in the JSON: the work folder does not outlive the run."""
    return path.read_text(errors="replace").strip().splitlines()[-lines:]


def run_part(name: str, mode: str, data: Path, work: Path, budget: float) -> dict:
    return finish_part(name, *start_part(name, mode, data, work), budget, work)


def run_parts(names: list[str], mode: str, data: Path, work: Path, budgets: dict, write) -> dict:
    """The untimed parts side by side, then the timed ones alone, one after another; a verdict line as each ends,
    and the results so far written (`write(results)`), so that a run stopped from outside still leaves them."""
    results = {}

    def run(name: str) -> None:
        results[name] = run_part(name, mode, data, work, budgets[name])

    side_by_side = [threading.Thread(target=run, args=(name,)) for name in names if name in UNTIMED]
    for thread in side_by_side:
        thread.start()
    for thread in side_by_side:
        thread.join()
    for name in names:
        if name not in results:
            run(name)
        print(f"[{results[name]['status']}] {name}: {results[name]['verdict']} ({results[name]['seconds']:.0f} s)",
              flush=True)
        for stream in ("stdout_tail", "stderr_tail"):
            if stream in results[name]:
                print(f"--- {name}: end of its {stream[:6]}", *results[name][stream], sep="\n", file=sys.stderr)
        write({done: results[done] for done in names if done in results})  # in the order asked for
    return results


def machine() -> dict:
    """The GPU and the versions that ran (read from the installed packages' metadata: a package that fails to import
    must not stop the report)."""
    import torch

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "MISSING"

    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "cuda": torch.version.cuda,
            **{name: version(name) for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets")},
            "cpus": os.cpu_count(), "python": sys.version.split()[0]}


def render(results: dict, info: dict, mode: str, seconds: float) -> str:
    where = f"{info['gpu']} (CUDA {info['cuda']})" if info["gpu"] else f"CPU only, {info['cpus']} cores"
    lines = [f"# GPU check ({'CPU mode: tiny sizes, verdicts of GPU sizes not judged' if mode == 'cpu' else 'GPU'})",
             "",
             f"{info['date']} on {where}; torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}, "
             f"peft {info['peft']}, bitsandbytes {info['bitsandbytes']}, datasets {info['datasets']}, Python {info['python']}. "
             f"Total {seconds / 60:.1f} min. Reproduce: `make gpu-check` (benchmarks/GPU_RUN.md).",
             "", "| part | verdict | result | time (s) |", "|---|---|---|---|"]
    for name, result in results.items():
        lines.append(f"| {name} | {result['status']} | {result['verdict']} | {result['seconds']:.0f} |")
    speed = results.get("speed", {}).get("figures", {})
    if speed.get("rows"):
        from benchmarks import dpo_bench

        lines += ["", "## DPO and SFT speed vs TRL", "",
                  f"{speed['parameters'] / 1e6:,.1f}M-parameter OLMoE-shaped model (vocabulary {speed['vocab_size']}), "
                  f"LoRA r=16 on attention and experts, batches of {speed['batch']}, {speed['dpo_steps']} DPO and "
                  f"{speed['sft_steps']} SFT steps, max length {speed['max_length']}; {speed['data']}. MFU against "
                  f"{speed['ceiling']['name']}. One run per variant.", "",
                  dpo_bench.table(speed["rows"], speed["memory_label"])]
    qlora = results.get("qlora", {}).get("figures", {})
    if qlora.get("runs"):
        from benchmarks import qlora_bench

        lines += ["", "## Expert QLoRA memory", "", "| variant | model (MiB) | adapters (MiB) | peak in the step (MiB) | "
                  "step (s) |", "|---|---|---|---|---|"]
        for variant, label in qlora_bench.VARIANTS.items():
            run = qlora["runs"][variant]
            lines.append(f"| {label} | {run['model_mib']:,.0f} | {run['adapters_mib']:,.1f} | "
                         f"{run['step_peak_mib']:,.0f} | {run['step_s']:.2f} |")
        lines += ["", f"One AdamW step on {qlora['batch']}x{qlora['sequence']} tokens with activation checkpointing, "
                  f"after {qlora['warmup']} untimed step; peak: torch.cuda.max_memory_allocated on a GPU, the resident "
                  "set on a CPU."]
    plan = results.get("plan_memory", {}).get("figures", {})
    if plan.get("rows"):
        lines += ["", "## Memory plan against the measured peak", "", "| row | plan (MiB) | measured (MiB) | "
                  "plan / measured | largest planned parts (MiB) |", "|---|---|---|---|---|"]
        lines += [f"| {r['row']} | {r['plan_mib']:,.0f} | {r['measured_mib']:,.0f} | {r['ratio']:.2f} | {r['parts']} |"
                  for r in plan["rows"]]
        lines += ["", f"Measured: {plan['method']}; the plan less its overhead row (benchmarks/plan_memory.py)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU: the check of the check")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding hh_rlhf/ (default %(default)s)")
    parser.add_argument("--out", type=Path, help="where results-gpu.md/.json go (default benchmarks/; with --cpu a "
                                                 "new temporary folder)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="gpu", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.data = args.data.resolve()  # the parts' recipes name the data files; their processes may run elsewhere
    if args.child:
        run_part_here(args.child, CPU_SIZES if args.mode == "cpu" else GPU_SIZES, args.data, args.work)
        return 0
    parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = [name for name in parts if name not in PARTS]
    if unknown:
        print(f"gpu_check: error: --parts: unknown part {unknown[0]!r}; parts are {', '.join(PARTS)}", file=sys.stderr)
        return 2
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA GPU is visible to torch; run on a GPU machine with a CUDA build of torch "
              "(make gpu-check TORCH_SPEC=...), or use --cpu for the tiny CPU version.", file=sys.stderr)
        return 2
    mode, sizes = ("cpu", CPU_SIZES) if args.cpu else ("gpu", GPU_SIZES)
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.cpu else ROOT / "benchmarks")
    info = {**machine(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)

    def write(results: dict) -> None:
        seconds = time.perf_counter() - started
        (out / "results-gpu.json").write_text(json.dumps({"machine": info, "mode": mode, "seconds": seconds,
                                                          "parts": results}, indent=1, default=str))
        (out / "results-gpu.md").write_text(render(results, info, mode, seconds))

    with tempfile.TemporaryDirectory(prefix="gpu-check-work-") as work:
        run_parts(parts, mode, args.data, Path(work), sizes["budgets_s"], write)
    print(f"written to {out / 'results-gpu.md'} and {out / 'results-gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
