"""Loading models and tokenizers: hub/local checkpoints, quantized bases, stage outputs, and what a stage trains.

Every stage output is a folder `from_pretrained` understands. Its manifest says whether it holds full weights
or an adapter, and on top of which earlier stage ("parent"), so a chain base -> sft -> dpo loads by walking
parents: the full weights at the root, each adapter merged in on the way.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from finetune.modeling import adapters, expert_quant, moe
from finetune.core import families
from finetune.config.recipe import MODEL_STAGES, ModelConfig, Recipe
from finetune.config.parsing import load_recipe
from finetune.core.rundir import read_manifest, require_complete
from finetune.modeling.tiny import train_tokenizer


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is fp32 on CPU (bf16 there is ~4x slower), bf16 on GPUs that support it, else fp16."""
    if name != "auto":
        return getattr(torch, name)
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def experts_kernel(model_config: ModelConfig) -> str:
    kernel = "grouped_mm" if model_config.experts_implementation == "auto" else model_config.experts_implementation
    if kernel == "batched_mm" and not torch.cuda.is_available():
        warnings.warn("model.experts_implementation=batched_mm runs 30-40x slower than grouped_mm on a CPU: "
                      "set it to auto.")
    return kernel


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- loading

def base_location(recipe: Recipe) -> str:
    """Where the base model's weights are: the hub id/path, or run_dir/base for tiny models."""
    if recipe.model.init is not None:
        require_complete(recipe.run_path, "base", needed_by="model loading")
        return str(recipe.run_path / "base")
    return recipe.model.name_or_path


def hub_kwargs(recipe: Recipe, location: str) -> dict:
    kwargs = {"trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.revision and location == recipe.model.name_or_path:
        kwargs["revision"] = recipe.model.revision
    return kwargs


def load_tokenizer(recipe: Recipe, texts=None):
    """The model's tokenizer. For a tiny model not built yet, one trained on `texts` (what the base stage will do)."""
    if recipe.model.init is not None and read_manifest(recipe.run_path / "base") is None:
        if texts is None:
            raise ValueError("load_tokenizer: a model.init recipe needs texts to train its tokenizer before the base stage.")
        tokenizer, location = train_tokenizer(texts, recipe.model.init.vocab_size), "model.init"
    else:
        location = base_location(recipe)
        tokenizer = AutoTokenizer.from_pretrained(location, **hub_kwargs(recipe, location))
    if recipe.model.chat_template is not None:
        tokenizer.chat_template = recipe.model.chat_template
    if tokenizer.chat_template is None:
        raise ValueError(f"{location} has no chat template (a base model's tokenizer); set model.chat_template in the "
                         f"recipe to a Jinja template or a .jinja file, or pick an instruct/chat model.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_family(recipe: Recipe, location: str) -> None:
    """An MoE family moetune does not know is refused before its weights load."""
    families.check_supported(AutoConfig.from_pretrained(location, **hub_kwargs(recipe, location)))


def load_pretrained(recipe: Recipe, location: str):
    check_family(recipe, location)
    return AutoModelForCausalLM.from_pretrained(
        location, dtype=resolve_dtype(recipe.model.dtype), experts_implementation=experts_kernel(recipe.model),
        **hub_kwargs(recipe, location),
    )


def load_quantized(recipe: Recipe, name: str):
    """A full-weights stage (`base`, or a full SFT) loaded for QLoRA: Linears through bitsandbytes, experts in NF4.

    It loads on the CPU (memory-mapped) and quantizes expert by expert onto the GPU when there is one, so the GPU
    only ever holds the 4-bit model.
    """
    location = base_location(recipe) if name == "base" else str(recipe.run_path / name)
    quantization = recipe.model.quantization
    dtype = resolve_dtype(recipe.model.dtype)
    compute_dtype = dtype if quantization.compute_dtype == "auto" else resolve_dtype(quantization.compute_dtype)
    check_family(recipe, location)
    skip = expert_quant.linears_to_keep(skeleton(recipe, location)) if quantization.bits == 4 else None
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=dtype, device_map="cpu", **hub_kwargs(recipe, location),
        quantization_config=expert_quant.bitsandbytes_config(quantization.bits, quantization.double_quant,
                                                             compute_dtype, skip),
    )
    expert_quant.disable_packed_cpu_path(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    expert_quant.quantize_experts(model, quantization.double_quant, compute_dtype, device)
    if device == "cuda":
        model = model.to("cuda")
        # accelerate refuses to train a quantized model whose recorded placement is not the training device
        model.hf_device_map = {"": torch.cuda.current_device()}
        return model
    # On the CPU the remaining weights still view the memory-mapped checkpoint, which keeps the whole file resident
    # (the replaced full-precision experts included) while any of them lives. Owning copies let the file go.
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.clone()
    return model


def skeleton(recipe: Recipe, location: str):
    """The model at `location` built on the meta device: its modules and shapes, no weights read."""
    config = AutoConfig.from_pretrained(location, **hub_kwargs(recipe, location))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)


def load_stage_model(recipe: Recipe, name: str):
    """The model a stage produced, adapters merged in: `base`, `sft`, `dpo`."""
    if name == "base":
        return load_pretrained(recipe, base_location(recipe))
    folder = recipe.run_path / name
    outputs = require_complete(recipe.run_path, name, needed_by="model loading")["outputs"]
    if outputs["kind"] == "full":
        return load_pretrained(recipe, str(folder))
    return adapters.merge_adapter(load_stage_model(recipe, outputs["parent"]), folder)


def load_for_inference(recipe: Recipe, name: str):
    """(model, tokenizer) ready for generation: a stage of this run, or any local path or hub id (adapters too)."""
    if name in MODEL_STAGES:
        model = load_stage_model(recipe, name)
        tokenizer = load_tokenizer(recipe)
    else:
        model, tokenizer = load_external(recipe, name)
    # generate() breaks while the config asks for router logits (it computes the aux loss on the cache).
    model.config.output_router_logits = False
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def load_external(recipe: Recipe, location: str):
    """(model, tokenizer) from a path or hub id that is not a stage of this run; an adapter is merged into its base."""
    adapter_dir = Path(location)
    trust = recipe.model.trust_remote_code
    if (adapter_dir / "adapter_config.json").is_file():
        base, tokenizer = load_adapter_base(adapter_dir, resolve_dtype(recipe.model.dtype), trust)
        model = adapters.merge_adapter(base, adapter_dir)
    else:
        model = load_pretrained(recipe, location)
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_adapter_base(adapter_dir: Path, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False):
    """(base model, tokenizer) an adapter folder sits on.

    A moetune stage's base is its parent stage in the same run dir (the folder it lies in, wherever that is now),
    loaded through the whole chain base -> sft -> dpo. Any other adapter names its base in adapter_config.json.
    """
    manifest = read_manifest(adapter_dir)
    if manifest is not None:
        recipe = load_recipe(adapter_dir / "recipe.yaml", [f"run_dir={adapter_dir.resolve().parent}"])
        return load_stage_model(recipe, manifest["outputs"]["parent"]), AutoTokenizer.from_pretrained(adapter_dir)
    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    # dtype "auto" keeps the checkpoint's own precision instead of upcasting a large model to fp32.
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    return model, AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------- what a training stage trains

def load_training_model(recipe: Recipe, stage: str, start: str):
    """(model, peft_config, parent): what a stage trains, the adapter to add (None: it trains all weights, or
    continues an adapter), and the stage its output sits on.

    In full precision a stage starts from `start` with its adapters merged in and adds a fresh adapter. A quantized
    base (QLoRA) is never merged into: when `start` is an adapter, training continues it on its quantized base (for
    DPO, TRL keeps a frozen copy of it as the reference policy) and the new adapter sits on that base too. Under
    ZeRO-3 the MoE blocks are marked as leaf modules; the family's own needs are met (families.prepare_for_training).
    """
    model, peft_config, parent = load_model_and_adapter(recipe, stage, start)
    families.prepare_for_training(model)
    moe.mark_moe_blocks_as_zero3_leaves(model)
    return model, peft_config, parent


def load_model_and_adapter(recipe: Recipe, stage: str, start: str):
    lora = recipe.model.lora_for(stage)
    if lora is None or recipe.model.quantization is None:
        model = load_stage_model(recipe, start)
        return model, adapters.peft_config(model, lora) if lora else None, start
    outputs = require_complete(recipe.run_path, start, needed_by=stage)["outputs"] if start != "base" else {}
    if outputs.get("kind") != "adapter":
        model = load_quantized(recipe, start)
        return model, adapters.peft_config(model, lora), start
    parent = outputs["parent"]
    base = load_quantized(recipe, parent)
    return expert_quant.load_adapter(base, str(recipe.run_path / start), trainable=True), None, parent
