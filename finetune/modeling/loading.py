"""Loading models and tokenizers: hub/local checkpoints, quantized bases, stage outputs, and what a stage trains.

Every stage output is a folder `from_pretrained` understands. Its manifest says whether it holds full weights
or an adapter, and on top of which earlier stage ("parent"), so a chain base -> sft -> dpo loads by walking
parents: the full weights at the root, each adapter merged in on the way.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from finetune.modeling import adapters, expert_parallel, expert_quant, flat_experts, moe
from finetune.core import families
from finetune.config.recipe import ModelConfig, ModelSource, RecipeError
from finetune.config.parsing import load_recipe
from finetune.core.rundir import read_manifest, require_complete
from finetune.modeling.tiny import train_tokenizer


def resolve_dtype(name: str, on_gpu: bool | None = None) -> torch.dtype:
    """`auto` is fp32 on CPU (bf16 there is ~4x slower), bf16 on GPUs that support it, else fp16.

    `on_gpu`: for a machine other than this one (the plan of a GPU run made on a CPU); None: this machine."""
    if name != "auto":
        return getattr(torch, name)
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
        if on_gpu and not torch.cuda.is_bf16_supported():
            return torch.float16
    return torch.bfloat16 if on_gpu else torch.float32


def experts_kernel(model_config: ModelConfig, config) -> dict:
    """The `experts_implementation` argument of from_pretrained: none for `auto`, so transformers takes grouped_mm
    where the family's experts can switch kernels and its own forward where they cannot (Llama 4's experts have
    no kernel choice, and passing one stops the load); the named kernel otherwise, refused up front where the
    family cannot use it."""
    kernel = model_config.experts_implementation
    if kernel == "auto":
        return {}
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_class is not None and not model_class._can_set_experts_implementation():
        raise ValueError(f"model.experts_implementation={kernel}: {model_class.__name__} runs its experts with its "
                         f"own forward and has no kernel choice; set model.experts_implementation to auto.")
    if kernel == "batched_mm" and not torch.cuda.is_available():
        warnings.warn("model.experts_implementation=batched_mm runs 30-40x slower than grouped_mm on a CPU: "
                      "set it to auto.")
    return {"experts_implementation": kernel}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- loading

def base_location(source: ModelSource) -> str:
    """Where the base model's weights are: the hub id/path, or run_dir/base for tiny models."""
    if source.model.init is not None:
        require_complete(source.run_path, "base", needed_by="model loading")
        return str(source.run_path / "base")
    return source.model.name_or_path


def hub_kwargs(source: ModelSource, location: str) -> dict:
    kwargs = {"trust_remote_code": source.model.trust_remote_code}
    if source.model.revision and location == source.model.name_or_path:
        kwargs["revision"] = source.model.revision
    return kwargs


def load_tokenizer(source: ModelSource, texts=None):
    """The model's tokenizer. For a tiny model not built yet, one trained on `texts` (what the base stage will do)."""
    if source.model.init is not None and read_manifest(source.run_path / "base") is None:
        if texts is None:
            raise ValueError("load_tokenizer: a model.init recipe needs texts to train its tokenizer before the base stage.")
        tokenizer, location = train_tokenizer(texts, source.model.init.vocab_size), "model.init"
    else:
        location = base_location(source)
        with naming_remote_code(location):
            tokenizer = AutoTokenizer.from_pretrained(location, **hub_kwargs(source, location))
    if source.model.chat_template is not None:
        tokenizer.chat_template = source.model.chat_template
    if tokenizer.chat_template is None:
        raise ValueError(f"{location} has no chat template (a base model's tokenizer); set model.chat_template in the "
                         f"recipe to a Jinja template or a .jinja file, or pick an instruct/chat model.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_family(source: ModelSource, location: str):
    """The config at `location`; an MoE family moetune does not know is refused before its weights load."""
    with naming_remote_code(location):
        config = AutoConfig.from_pretrained(location, **hub_kwargs(source, location))
    families.check_supported(config)
    return config


def remote_code_refused(location: str) -> RecipeError:
    return RecipeError(
        f"{location} ships its own Python code (files named by auto_map in its config), which moetune runs only when "
        f"the recipe sets model.trust_remote_code: true. That code runs with everything your user may do on this "
        f"machine (read and write files, use the network and your tokens): set it only for a repository you trust, "
        f"after reading its .py files.")


@contextmanager
def naming_remote_code(location: str) -> Iterator[None]:
    """transformers' refusal (it says `trust_remote_code=True` and builds a Hub URL from a local path) as the
    recipe key that allows it."""
    try:
        yield
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise remote_code_refused(location) from None
        raise


def load_pretrained(source: ModelSource, location: str):
    """Whole, or with its experts split across the processes of a launch (model.expert_parallel)."""
    config = check_family(source, location)
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=resolve_dtype(source.model.dtype), **experts_kernel(source.model, config),
        **hub_kwargs(source, location), **expert_parallel.load_kwargs(source.model, config),
    )
    return set_up_loaded(model)


def set_up_loaded(model):
    """What every model moetune loads gets before anything reads its experts: flat expert matrices (DBRX) seen as
    3-D, and routers or experts whose weights another module reads made to read them through their LoRA."""
    flat_experts.stack_flat_experts(model)
    adapters.route_router_reads_through_lora(model)
    return model


def load_quantized(source: ModelSource, name: str):
    """A full-weights stage (`base`, or a full SFT) loaded for QLoRA: Linears through bitsandbytes, experts in NF4.

    It loads on the CPU (memory-mapped) and quantizes expert by expert onto the GPU when there is one, so the GPU
    only ever holds the 4-bit model.
    """
    location = base_location(source) if name == "base" else str(source.run_path / name)
    quantization = source.model.quantization
    dtype = resolve_dtype(source.model.dtype)
    compute_dtype = dtype if quantization.compute_dtype == "auto" else resolve_dtype(quantization.compute_dtype)
    check_family(source, location)
    skip = expert_quant.linears_to_keep(skeleton(source, location)) if quantization.bits == 4 else None
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=dtype, device_map="cpu", **hub_kwargs(source, location),
        quantization_config=expert_quant.bitsandbytes_config(quantization.bits, quantization.double_quant,
                                                             compute_dtype, skip),
    )
    expert_quant.disable_packed_cpu_path(model)
    set_up_loaded(model)
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


def skeleton(source: ModelSource, location: str):
    """The model at `location` built on the meta device: its modules and shapes, no weights read."""
    config = AutoConfig.from_pretrained(location, **hub_kwargs(source, location))
    with torch.device("meta"):
        return set_up_loaded(AutoModelForCausalLM.from_config(config, trust_remote_code=source.model.trust_remote_code))


# The name eval.models and the chain's `parent` give the recipe's base model: run_dir/base (model.init), else
# model.name_or_path.
BASE_MODEL = "base"


def load_stage_model(source: ModelSource, name: str):
    """The model a stage produced, adapters merged in: `base`, `sft`, `dpo`."""
    if name == BASE_MODEL:
        return load_pretrained(source, base_location(source))
    folder = source.run_path / name
    outputs = require_complete(source.run_path, name, needed_by="model loading")["outputs"]
    if outputs["kind"] == "full":
        return load_pretrained(source, str(folder))
    base = load_stage_model(source, outputs["parent"])
    return adapters.merge_adapter(base, folder)


def load_for_inference(source: ModelSource, name: str, of_this_run: bool):
    """(model, tokenizer) ready for generation: this run's stage `name` (`of_this_run`: the stage registry says
    which names are stages), or any local path or hub id (adapters too)."""
    if of_this_run:
        model = load_stage_model(source, name)
        tokenizer = load_tokenizer(source)
    else:
        model, tokenizer = load_external(source, name)
    families.prepare_for_generation(model)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def load_external(source: ModelSource, location: str):
    """(model, tokenizer) from a path or hub id that is not a stage of this run; an adapter is merged into its base."""
    adapter_dir = Path(location)
    trust = source.model.trust_remote_code
    if (adapter_dir / "adapter_config.json").is_file():
        base, tokenizer = load_adapter_base(adapter_dir, resolve_dtype(source.model.dtype), trust)
        model = adapters.merge_adapter(base, adapter_dir)
    else:
        model = load_pretrained(source, location)
        with naming_remote_code(location):
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
        parent = load_stage_model(recipe.model_source, manifest["outputs"]["parent"])
        return parent, AutoTokenizer.from_pretrained(adapter_dir)
    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    # dtype "auto" keeps the checkpoint's own precision instead of upcasting a large model to fp32.
    model = set_up_loaded(AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code))
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    return model, AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------- what a training stage trains

def load_training_model(source: ModelSource, stage: str, start: str):
    """(model, peft_config, parent): what a stage trains, the adapter to add (None: it trains all weights, or
    continues an adapter), and the stage its output sits on.

    In full precision a stage starts from `start` with its adapters merged in and adds a fresh adapter. A quantized
    base (QLoRA) is never merged into: when `start` is an adapter, training continues it on its quantized base (for
    DPO, TRL keeps a frozen copy of it as the reference policy) and the new adapter sits on that base too. Under
    ZeRO-3 the MoE blocks are marked as leaf modules; the family's own needs are met (families.prepare_for_training).
    """
    model, peft_config, parent = load_model_and_adapter(source, stage, start)
    if getattr(model, "is_distributed_loading_by_transformers", False):
        print(f"[{stage}] process {os.environ.get('RANK', '0')}: "
              f"{expert_parallel.describe(model, source.model.expert_parallel)}", flush=True)
    families.prepare_for_training(model)
    moe.mark_moe_blocks_as_zero3_leaves(model)
    return model, peft_config, parent


def load_model_and_adapter(source: ModelSource, stage: str, start: str):
    lora = source.model.lora_for(stage)
    if lora is None or source.model.quantization is None:
        model = load_stage_model(source, start)
        return model, adapters.peft_config(model, lora) if lora else None, start
    outputs = require_complete(source.run_path, start, needed_by=stage)["outputs"] if start != "base" else {}
    if outputs.get("kind") != "adapter":
        model = load_quantized(source, start)
        return model, adapters.peft_config(model, lora), start
    parent = outputs["parent"]
    base = load_quantized(source, parent)
    return expert_quant.load_adapter(base, str(source.run_path / start), trainable=True), None, parent
