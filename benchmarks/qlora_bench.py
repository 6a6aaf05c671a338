"""QLoRA memory benchmark: expert-quantized QLoRA (moetune) vs LoRA on the full-precision base vs stock bitsandbytes
4-bit (which quantizes only nn.Linear layers and leaves the fused experts in full precision).

The model is a Mixtral built from a config (40M parameters, 94% of them in the experts; Mixtral-8x7B has 97%), in
moetune's default dtype for the machine (fp32 on CPU, bf16 on GPUs that support it). Each variant loads it, adds the
same LoRA (attention and experts, r=16) and takes one training step (AdamW, activation checkpointing) in its own
process, so the peak memory is that variant's alone. Reported, medians of several runs: model memory (the base
weights with their quantization scales; the adapters apart), the peak memory during the training step (on CPU the
process's resident set, whose peak is reset after loading; on CUDA, peak allocated) and the resident peak while
loading. Then Mixtral-8x7B's memory, from its parameter counts (its config on the meta device) and the bits per
weight measured here.

Run: python -m benchmarks.qlora_bench [--runs 3]   (about 5 minutes on a busy 2-core CPU)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig

from finetune.modeling import adapters, expert_quant, moe
from finetune.modeling.loading import load_quantized, resolve_dtype
from finetune.config.recipe import LoraConfig
from finetune.config.parsing import parse_recipe

VARIANTS = {
    "expert_nf4": "(a) QLoRA, experts in NF4 (moetune)",
    "full_precision": "(b) LoRA on the full-precision base",
    "stock_bnb4": "(c) stock bitsandbytes 4-bit",
}
BENCH_MODEL = dict(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
BATCH, SEQUENCE = 4, 128
LORA = LoraConfig(targets=["attention", "experts"], r=16)
ON_GPU = torch.cuda.is_available()


# ---------------------------------------------------------------- in the child process

def load_variant(variant: str, folder: str):
    if variant == "expert_nf4":
        recipe = parse_recipe({"run_dir": folder, "model": {"name_or_path": folder, "lora": {},
                                                            "quantization": {"bits": 4}}}, "<bench>")
        return load_quantized(recipe.model_source, "base")
    device, dtype = "cuda" if ON_GPU else "cpu", resolve_dtype("auto")
    if variant == "full_precision":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device)
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, device_map=device,
        quantization_config=expert_quant.bitsandbytes_config(4, double_quant=True, compute_dtype=dtype))


def bytes_by_part(model) -> dict[str, int]:
    """Bytes of the base weights by part (experts, the rest), and of the adapters; bitsandbytes' scales included."""
    parts = {"experts": 0, "rest": 0, "adapters": 0}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        part = "adapters" if "lora_" in name else "experts" if ".experts." in name else "rest"
        parts[part] += expert_quant.tensor_bytes(tensor)
    return parts


def status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status: VmHWM (peak resident set) or VmRSS (current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> float:
    """Start measuring the peak afresh; returns the memory in use now.

    On the CPU: hand memory freed while loading back to the system (glibc keeps it otherwise), then reset the peak
    resident set (VmHWM) to the current one (Linux: write 5 to /proc/self/clear_refs)."""
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return status_mib("VmRSS")


def peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if ON_GPU else status_mib("VmHWM")


def measure(variant: str, folder: str, batch: int = BATCH, sequence: int = SEQUENCE, warmup: int = 0,
            profile: bool = False) -> dict:
    """Load one variant, add LoRA, take one training step (after `warmup` untimed ones); return its memory figures,
    and with `profile` the NF4 kernels' share of one more step."""
    imports = status_mib("VmHWM")
    model = load_variant(variant, folder)
    load_peak = status_mib("VmHWM")
    model = peft.get_peft_model(model, adapters.peft_config(model, LORA))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    parts = bytes_by_part(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, sequence), generator=torch.Generator().manual_seed(0))
    ids = ids.to("cuda" if ON_GPU else "cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(warmup):
        training_step(model, optimizer, ids)
    step_start = reset_peak()
    start = time.perf_counter()
    training_step(model, optimizer, ids)
    seconds = time.perf_counter() - start
    step_peak = peak_mib()
    figures = {"parts": parts, "model_mib": (parts["experts"] + parts["rest"]) / 2**20,
               "adapters_mib": parts["adapters"] / 2**20, "step_s": seconds, "imports_mib": imports,
               "load_peak_mib": load_peak, "step_peak_mib": step_peak, "step_growth_mib": step_peak - step_start}
    if profile:
        figures["nf4_share"] = nf4_share(model, optimizer, ids)
    return figures


def training_step(model, optimizer, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if ON_GPU:
        torch.cuda.synchronize()  # the step's kernels have run: its time is theirs


def nf4_share(model, optimizer, ids) -> float:
    """The share of one training step's kernel time (CPU time on a CPU) spent in bitsandbytes' NF4 operations
    (dequantizing, 4-bit matmuls), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    with profile(activities=activities) as profiler:
        training_step(model, optimizer, ids)
    events = profiler.key_averages()
    # On a GPU the kernels carry the device time (bitsandbytes' are kDequantize*, k*4bit*): kernels only, since an
    # operator also counts the time of the kernels it launched. On a CPU the operators (bitsandbytes::dequantize_4bit,
    # ...) carry their own CPU time.
    if ON_GPU:
        events = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    own_time = (lambda e: e.self_device_time_total) if ON_GPU else (lambda e: e.self_cpu_time_total)
    total = sum(own_time(e) for e in events)
    return sum(own_time(e) for e in events if is_nf4_operation(e.key)) / total if total else 0.0


def is_nf4_operation(name: str) -> bool:
    return "bitsandbytes::" in name or "dequantize" in name.lower() or "4bit" in name.lower()


# ---------------------------------------------------------------- in the parent process

def parameter_counts(model) -> dict:
    """Parameters by part: fused experts, the other Linears (attention), the rest (embeddings, lm_head, routers...)."""
    experts = sum(getattr(m, name).numel() for m in model.modules() if moe.is_experts(m) for name in moe.EXPERT_PARAMETERS)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    return {"total": total, "experts": experts, "linear": linear, "rest": total - experts - linear}


def build_model(folder: Path, shape: dict = BENCH_MODEL) -> dict:
    """Save a Mixtral of this shape (in the machine's default dtype, built where it trains: on a GPU it never exists in
    fp32 or in CPU memory); return its parameter counts."""
    torch.manual_seed(0)
    with torch.device("cuda" if ON_GPU else "cpu"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **shape), dtype=resolve_dtype("auto"))
    model.save_pretrained(folder)
    return parameter_counts(model)


def run_child(variant: str, folder: Path, **options) -> dict:
    """measure(variant, folder, **options) in a process of its own."""
    code = ("import json, sys; from benchmarks.qlora_bench import measure; "
            "print(json.dumps(measure(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))))")
    result = subprocess.run([sys.executable, "-c", code, variant, str(folder), json.dumps(options)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def mixtral_8x7b_counts() -> dict:
    """Mixtral-8x7B's parameter counts by part, and its LoRA's: its config instantiated on the meta device
    (nothing is downloaded or allocated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(MixtralConfig())  # the defaults are Mixtral-8x7B's
    counts = parameter_counts(model)
    lora = peft.get_peft_model(model, adapters.peft_config(model, LORA))
    counts["lora"] = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    return counts


def print_mixtral_projection(nf4_bits: float) -> None:
    """Mixtral-8x7B's memory at the measured bits per NF4 weight (bitsandbytes' NF4 Linears store the same)."""
    mixtral = mixtral_8x7b_counts()
    gib = 2**30
    bf16 = mixtral["total"] * 2 / gib
    stock = (mixtral["linear"] * nf4_bits / 8 + (mixtral["experts"] + mixtral["rest"]) * 2) / gib
    ours = ((mixtral["experts"] + mixtral["linear"]) * nf4_bits / 8 + mixtral["rest"] * 2) / gib
    lora_training = mixtral["lora"] * 16 / gib  # fp32 weights, gradients and AdamW's two moments
    print(f"\nMixtral-8x7B: {mixtral['total'] / 1e9:.2f}B parameters ({mixtral['experts'] / 1e9:.2f}B in experts, "
          f"{mixtral['linear'] / 1e9:.2f}B in attention Linears, {mixtral['rest'] / 1e9:.2f}B embeddings, lm_head, "
          f"routers, norms); model memory at {nf4_bits:.2f} bits per NF4 weight, the rest in bf16:")
    print(f"  bf16 {bf16:.1f} GiB | stock bitsandbytes 4-bit {stock:.1f} GiB | experts in NF4 {ours:.1f} GiB "
          f"({ours / bf16:.2f}x of bf16)")
    print(f"  LoRA r={LORA.r} on attention and experts: {mixtral['lora'] / 1e6:.0f}M parameters, {lora_training:.1f} GiB "
          f"with gradients and AdamW state; activations come on top (batch and sequence length)")


def print_results(results: dict[str, list[dict]]) -> None:
    baseline = {key: median_of(results["full_precision"], key) for key in ("model_mib", "step_peak_mib")}
    for variant, label in VARIANTS.items():
        runs = results[variant]
        model_mib, step_peak = median_of(runs, "model_mib"), median_of(runs, "step_peak_mib")
        print(f"{label:<38} model {model_mib:6.1f} MiB ({model_mib / baseline['model_mib']:.2f}x) + adapters "
              f"{median_of(runs, 'adapters_mib'):.1f} MiB | peak in a training step {step_peak:4.0f} MiB "
              f"({step_peak / baseline['step_peak_mib']:.2f}x), {median_of(runs, 'step_growth_mib'):3.0f} MiB above "
              f"its start | resident peak while loading {median_of(runs, 'load_peak_mib'):4.0f} MiB | "
              f"step {median_of(runs, 'step_s'):.1f} s")
    if ON_GPU:
        print("(peak in a step: torch.cuda.max_memory_allocated)")
    else:
        print(f"(peak in a step: the process's resident set, {median_of(results['full_precision'], 'imports_mib'):.0f} "
              f"MiB of it the imported libraries, the same in every variant)")
    ratio = median_of(results["expert_nf4"], "model_mib") / baseline["model_mib"]
    print(f"target: (a) at most 0.35x of (b)'s model memory: {'met' if ratio <= 0.35 else 'NOT met'} ({ratio:.2f}x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="Processes per variant (medians are reported).")
    args = parser.parse_args(argv)
    device = torch.cuda.get_device_name() if ON_GPU else "CPU"
    with tempfile.TemporaryDirectory() as folder:
        counts = build_model(Path(folder))
        print(f"QLoRA benchmark on {device}: Mixtral-style model in {str(resolve_dtype('auto')).split('.')[-1]}, "
              f"{counts['total'] / 1e6:.1f}M parameters, {100 * counts['experts'] / counts['total']:.1f}% in experts; "
              f"LoRA r={LORA.r} on attention and experts; one AdamW step on {BATCH}x{SEQUENCE} tokens with activation "
              f"checkpointing; medians of {args.runs} runs, each variant in its own process", flush=True)
        results = {variant: [run_child(variant, Path(folder)) for _ in range(args.runs)] for variant in VARIANTS}
    print_results(results)
    nf4_bits = 8 * results["expert_nf4"][0]["parts"]["experts"] / counts["experts"]
    print(f"NF4 experts: {nf4_bits:.2f} bits per expert weight")
    print_mixtral_projection(nf4_bits)


if __name__ == "__main__":
    main()
