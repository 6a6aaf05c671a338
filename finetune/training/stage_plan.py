"""The memory and time plan of a recipe's training stages: `moetune plan`, and the check before a stage loads a model.

finetune/modeling/memory_plan.py computes from a model's shapes and a `Setup` of plain numbers; this module reads
the recipe (the model, its LoRA and quantization, the stage's TRL fields as they will run, the speed levers, the
data's real tokens) and the machine the run targets (`Target`: GPUs named by --gpus, or --gpu-memory and
--num-processes, or this machine), and prints or refuses.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from finetune.modeling import adapters
from finetune.modeling import memory_plan
from finetune.modeling.memory_plan import GiB, ROWS, Census, Setup, StagePlan
from finetune.modeling.loading import base_location, hub_kwargs, resolve_dtype, set_up_loaded
from finetune.config.recipe import TRAINING_STAGES, Recipe, RecipeError
from finetune.config.validation import parse_memory
from finetune.core.rundir import read_manifest
from finetune.modeling.tiny import family_config
from finetune.training.trainer_config import stage_value

# GPU kinds --gpus names: (memory torch reports, dense bf16 tensor FLOP/s from the vendor's data sheet)
GPUS = {
    "H100-80GB": (79.2 * GiB, 989e12), "H200": (139.8 * GiB, 989e12), "H200-141GB": (139.8 * GiB, 989e12),
    "A100-80GB": (79.2 * GiB, 312e12), "A100-40GB": (39.4 * GiB, 312e12), "L40S": (44.4 * GiB, 362e12),
    "RTX4090": (23.6 * GiB, 165e12), "A10G": (22.1 * GiB, 70e12),
}
UNKNOWN_GPU_FLOPS = 312e12  # --gpu-memory without a named GPU: an A100's, said in the printout
CPU_FLOPS = 130e9  # this project's 2-core AVX2 machines: fp32 matmul at 2048^3 (shared/STACK.md)
MFU = {"cuda": 0.25, "cpu": 0.3}
TOKEN_SAMPLE = 2000  # rows tokenized to measure the data's tokens (spread over the file; the rest scaled)


@dataclass(frozen=True)
class Target:
    """Where the run goes: the device kind, memory per device (None: unknown), processes, layout, FLOP/s each."""

    device: str
    memory: float | None
    processes: int
    layout: str
    flops: float
    name: str


def parse_gpus(text: str) -> tuple[int, str]:
    """`8xH100-80GB` -> (8, "H100-80GB")."""
    count, _, kind = text.partition("x")
    if not count.isdigit() or int(count) < 1 or kind not in GPUS:
        raise RecipeError(f"--gpus {text}: write COUNTxKIND, e.g. 8xH100-80GB; kinds: {', '.join(GPUS)} (or give "
                          f"--gpu-memory 24GiB --num-processes 4 for another GPU).")
    return int(count), kind


def layout_of_environment() -> str:
    """The layout of this process when accelerate launched it (its environment says which)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "zero3" if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" else "zero2"
    return "fsdp2" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else "ddp"


def host_memory() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def make_target(recipe: Recipe, gpus: str | None = None, gpu_memory: str | None = None, processes: int | None = None,
                layout: str | None = None) -> Target:
    """The machine a plan is for: --gpus, else --gpu-memory (or plan.memory) GPUs, else this machine's GPU or CPU.

    `layout`: ddp, zero2, zero3 or fsdp2 (finetune/launch.py reads it off an accelerate config); None: this
    process's, as accelerate launched it."""
    layout = layout or layout_of_environment()
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    if gpus:
        processes, kind = parse_gpus(gpus)
        memory, flops = GPUS[kind]
        return Target("cuda", memory, processes, layout, flops, f"{processes} x {kind}")
    memory = gpu_memory or recipe.plan.memory
    if gpu_memory or torch.cuda.is_available():
        if memory is None:
            memory = torch.cuda.get_device_properties(0).total_memory
            name = torch.cuda.get_device_name(0)
        else:
            memory, name = parse_memory(memory), f"GPU of {memory}"
        return Target("cuda", memory, processes, layout, UNKNOWN_GPU_FLOPS, f"{processes} x {name}")
    # a CPU run: the processes share the host's RAM
    total = parse_memory(memory) * processes if memory else host_memory()
    return Target("cpu", total / processes, processes, layout, CPU_FLOPS,
                  f"this CPU ({total / GiB:.1f} GiB RAM{f', {processes} processes' if processes > 1 else ''})")


# ---------------------------------------------------------------- the recipe as numbers

def skeleton_config(recipe: Recipe):
    """The base model's config: its folder or Hub config.json, or model.init's sizes before the base stage built it."""
    if recipe.model.init is not None and read_manifest(recipe.run_path / "base") is None:
        # shapes only: no token ids (a family default, e.g. FlexOlmo's pad id 100277, may lie past the tiny vocabulary)
        return family_config(recipe.model.init, recipe.model.init.vocab_size, pad_token_id=None, eos_token_id=None)
    location = base_location(recipe.model_source)
    return AutoConfig.from_pretrained(location, **hub_kwargs(recipe.model_source, location))


def model_census(recipe: Recipe) -> Census:
    """The base model's counts, from a model built on the meta device (no weights read)."""
    config = skeleton_config(recipe)
    with torch.device("meta"):
        model = set_up_loaded(AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code))
    return memory_plan.census(model)


def stage_setup(recipe: Recipe, stage: str, target: Target) -> Setup:
    on_gpu = target.device == "cuda"
    lora = recipe.model.lora_for(stage)
    quantization = recipe.model.quantization if lora else None
    settings = recipe.trainer_settings(stage)
    return Setup(
        stage=stage, weight_bytes=resolve_dtype(recipe.model.dtype, on_gpu).itemsize,
        lora_roles=frozenset(adapters.expand_roles(lora.targets)) if lora else None, lora_r=lora.r if lora else 0,
        quant_bits=quantization.bits if quantization else None,
        double_quant=quantization.double_quant if quantization else True,
        batch=stage_value(settings, "per_device_train_batch_size", on_gpu),
        max_length=stage_value(settings, "max_length", on_gpu) or 1024,
        activation_checkpointing=bool(stage_value(settings, "activation_checkpointing", on_gpu)),
        padding_free=recipe.speed.padding_free, reference=reference_kind(recipe, stage, on_gpu),
        layout=layout_of_recipe(recipe, target), processes=target.processes, device=target.device,
        expert_parallel=recipe.model.expert_parallel)


def layout_of_recipe(recipe: Recipe, target: Target) -> str:
    """ep where the recipe splits the experts (model.expert_parallel) over a plain launch of several processes
    (--accelerate ep or ddp: finetune/modeling/expert_parallel.py); else the target's layout, ddp for an ep launch
    that splits nothing (expert_parallel 1, or one process, which loads the model whole). A DeepSpeed or FSDP launch
    with expert_parallel is refused before loading."""
    if target.layout in ("ddp", "ep"):
        return "ep" if recipe.model.expert_parallel > 1 and target.processes > 1 else "ddp"
    return target.layout


def reference_kind(recipe: Recipe, stage: str, on_gpu: bool) -> str:
    """What DPO's reference policy costs: see finetune/dpo.py."""
    if stage != "dpo":
        return "none"
    if stage_value(recipe.trainer_settings(stage), "precompute_ref_log_probs", on_gpu):
        return "cached"
    if recipe.model.lora_for("dpo") is None:
        return "copy"
    if recipe.model.quantization is not None and recipe.model.lora_for("sft") is not None:
        return "adapter_copy"  # DPO continues the SFT adapter on the quantized base; TRL keeps a frozen copy of it
    return "adapter_off"


# ---------------------------------------------------------------- the data's real tokens

def data_tokens(recipe: Recipe, stage: str, max_length: int) -> int | None:
    """Tokens one epoch of the stage trains on (each sequence cut at max_length; a DPO pair's prompt once with
    padding-free batches), counted with the model's tokenizer on up to TOKEN_SAMPLE rows of the prepared data.
    None when the data is not prepared yet or the tokenizer is not available."""
    path = recipe.run_path / "data" / ("sft" if stage == "sft" else "preference") / "train.jsonl"
    if not path.is_file():
        return None
    try:
        from finetune.modeling.loading import load_tokenizer

        tokenizer = load_tokenizer(recipe.model_source)
    except (OSError, ValueError):
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    step = max(1, len(lines) // TOKEN_SAMPLE)
    sample = [json.loads(line) for line in lines[::step]]
    counted = sum(row_tokens(tokenizer, row, max_length, recipe.speed.padding_free) for row in sample)
    return round(counted * len(lines) / max(1, len(sample)))


def row_tokens(tokenizer, row: dict, max_length: int, padding_free: bool) -> int:
    def length(messages) -> int:
        return min(max_length, len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]))

    if "messages" in row:
        return length(row["messages"])
    prompt = len(tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True)["input_ids"])
    chosen, rejected = length(row["prompt"] + row["chosen"]), length(row["prompt"] + row["rejected"])
    return chosen + rejected - (min(prompt, chosen, rejected) if padding_free else 0)


# ---------------------------------------------------------------- plans

def planned_stages(recipe: Recipe, stages: list[str]) -> list[str]:
    return [stage for stage in TRAINING_STAGES if stage in stages]


def plan_recipe(recipe: Recipe, target: Target, stages: list[str] | None = None, with_time: bool = True,
                census: Census | None = None) -> list[StagePlan]:
    """The plan of each training stage of `stages` (default: all of them) on `target`."""
    census = census or model_census(recipe)
    plans = []
    for stage in planned_stages(recipe, stages or list(TRAINING_STAGES)):
        setup = stage_setup(recipe, stage, target)
        plan = memory_plan.plan_stage(census, setup, target.memory)
        if target.layout == "ep" and setup.layout != "ep":
            plan.notes.append(f"planned as ddp: --accelerate ep splits the experts only with model.expert_parallel "
                              f"above 1 and several processes (here {recipe.model.expert_parallel} and "
                              f"{target.processes})")
        memory_plan.cheapest_change(census, plan)
        if with_time:
            add_time(recipe, plan, target)
        plans.append(plan)
    return plans


def add_time(recipe: Recipe, plan: StagePlan, target: Target) -> None:
    mfu = recipe.plan.mfu or MFU[target.device]
    plan.epoch_tokens = data_tokens(recipe, plan.stage, plan.setup.max_length)
    if plan.epoch_tokens is not None:
        plan.epoch_seconds = plan.epoch_tokens * plan.flops_per_token / (target.flops * mfu * target.processes)
    plan.notes.append(f"time at {mfu:.0%} MFU of {target.flops / 1e12:g} TFLOP/s per "
                      f"{'GPU' if target.device == 'cuda' else 'CPU'}")


def refuse_if_too_big(recipe: Recipe, stages: list[str], target: Target) -> None:
    """Before a training stage loads a model: a plan over the memory per device refuses (plan.refuse)."""
    if not recipe.plan.refuse or target.memory is None or not planned_stages(recipe, stages):
        return
    try:
        census = model_census(recipe)
    except (OSError, ValueError) as error:  # no readable config here (an adapter folder, a broken file): the
        # stage's own loading reports that better; the plan cannot judge what it cannot build
        print(f"[plan] memory check skipped: the model's config could not be built ({error})", flush=True)
        return
    for plan in plan_recipe(recipe, target, stages, with_time=False, census=census):
        if not plan.fits:
            biggest = sorted(plan.rows.items(), key=lambda item: -item[1])[:3]
            parts = ", ".join(f"{name} {size(part)}" for name, part in biggest)
            fix = (f"The cheapest change that fits: {plan.change} ({size(plan.change_total)})."
                   if plan.change_total is not None else f"No single change fits ({plan.change}).")
            raise RecipeError(
                f"{recipe.source}: the {plan.stage} stage needs about {size(plan.total)} per "
                f"{'GPU' if target.device == 'cuda' else 'process'} ({parts}; `moetune plan {recipe.source}` "
                f"shows every part) but {target.name} has {size(target.memory)}. {fix} Or set "
                f"plan.refuse=false to run it anyway.")


# ---------------------------------------------------------------- printing

def describe_setup(s: Setup) -> str:
    if s.lora_roles is None:
        training = "full fine-tuning"
    else:
        training = f"LoRA r={s.lora_r} on {', '.join(sorted(s.lora_roles))}"
        if s.quant_bits:
            training += f", base in {s.quant_bits}-bit with NF4 experts"
    unit = "pairs" if s.stage == "dpo" else "sequences"
    parts = [training, f"{s.batch} {unit} x {s.max_length} tokens per step",
             f"activation checkpointing {'on' if s.activation_checkpointing else 'off'}",
             "padding-free" if s.padding_free else "padded"]
    if s.layout == "ep":
        parts.append(f"each MoE layer's experts split across {s.expert_parallel} processes, the rest FSDP2-sharded "
                     f"over {s.processes}")
    if s.stage == "dpo":
        parts.append(f"reference: {REFERENCES[s.reference]}")
    return "; ".join(parts)


REFERENCES = {"cached": "log-probs cached before training", "copy": "a frozen copy of the SFT model",
              "adapter_off": "the policy with its adapter off", "adapter_copy": "a frozen copy of the SFT adapter",
              "none": "none"}
ROW_NOTES = {"weights": "frozen and trained weights (a sharded layout: this process's shard + 2 gathered layers)",
             "adapter": "LoRA weights in fp32", "gradients": "one per trained weight",
             "optimizer": "AdamW moments (DeepSpeed: + fp32 master weights)",
             "activations": "kept for the backward at a full micro-batch",
             "lm_head": "scored LM head: logits tile + per-token state",
             "reference": "DPO reference beyond the policy",
             "overhead": "framework: CUDA context and allocator slack (GPU); interpreter and libraries (CPU)"}


def size(n: float) -> str:
    """Bytes as GiB, or MiB below a tenth of one."""
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))


def flops(n: float) -> str:
    return f"{n / 1e9:.1f} GFLOP" if n >= 1e8 else f"{n / 1e6:.2f} MFLOP"


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def render(plans: list[StagePlan], target: Target, source: str) -> str:
    lines = [f"moetune plan {source}: {target.name}, {target.processes} process"
             f"{'es' if target.processes > 1 else ''}, layout {plans[0].setup.layout if plans else target.layout}"]
    for plan in plans:
        lines += ["", f"{plan.stage}: {describe_setup(plan.setup)}", "",
                  f"  {'parameters':<16}{'total':>12}{'active/token':>14}{'trainable':>12}"]
        p = plan.parameters
        for role in sorted(p["total"], key=lambda r: -p["total"][r]):
            lines.append(f"  {role:<16}{count(p['total'][role]):>12}{count(p['active'].get(role, 0)):>14}"
                         f"{count(p['trainable'].get(role, 0)):>12}")
        lines.append(f"  {'all':<16}{count(sum(p['total'].values())):>12}{count(sum(p['active'].values())):>14}"
                     f"{count(sum(p['trainable'].values())):>12}")
        unit = "GPU" if plan.setup.device == "cuda" else "process"
        lines += ["", f"  {'memory per ' + unit:<20}{'GiB':>8}"]
        lines += [f"  {name:<20}{plan.rows[name] / GiB:>8.2f}   {ROW_NOTES[name]}" for name in ROWS]
        verdict = ""
        if plan.memory is not None:
            verdict = f" of {plan.memory / GiB:.2f}: " + ("fits" if plan.fits else "DOES NOT FIT")
        lines.append(f"  {'total':<20}{plan.total / GiB:>8.2f}{verdict}")
        if plan.change:
            size = f" ({plan.change_total / GiB:.2f} GiB)" if plan.change_total is not None else ""
            lines.append(f"  cheapest change that fits: {plan.change}{size}")
        if plan.epoch_seconds is not None:
            lines.append(f"  time per epoch: {duration(plan.epoch_seconds)} for {count(plan.epoch_tokens)} tokens "
                         f"({flops(plan.flops_per_token)} per token)")
        else:
            lines.append(f"  time per epoch: run `moetune prep` first (it counts the data's tokens); "
                         f"{flops(plan.flops_per_token)} per token")
        lines += [f"  {note}" for note in plan.notes]
    return "\n".join(lines)


def as_json(plans: list[StagePlan], target: Target) -> str:
    def stage(plan: StagePlan) -> dict:
        setup = asdict(plan.setup)
        setup["lora_roles"] = sorted(setup["lora_roles"]) if setup["lora_roles"] is not None else None
        return {"stage": plan.stage, "setup": setup, "parameters": plan.parameters,
                "memory_gib": {name: round(plan.rows[name] / GiB, 4) for name in ROWS},
                "total_gib": round(plan.total / GiB, 4),
                "available_gib": None if plan.memory is None else round(plan.memory / GiB, 4), "fits": plan.fits,
                "change": plan.change,
                "change_total_gib": None if plan.change_total is None else round(plan.change_total / GiB, 4),
                "flops_per_token": plan.flops_per_token, "epoch_tokens": plan.epoch_tokens,
                "epoch_seconds": plan.epoch_seconds, "notes": plan.notes}

    return json.dumps({"target": asdict(target), "stages": [stage(plan) for plan in plans]}, indent=2)


def plan_command(recipe: Recipe, target: Target, as_json_output: bool) -> None:
    plans = plan_recipe(recipe, target)
    print(as_json(plans, target) if as_json_output else render(plans, target, recipe.source))
