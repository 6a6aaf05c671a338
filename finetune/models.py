"""Loading models and tokenizers: hub/local checkpoints, tiny models built from a config, and stage outputs.

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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from finetune import distributed
from finetune.recipe import ModelConfig, ModelInit, Recipe, load_recipe
from finetune.stage import Stage, read_manifest, require_complete

SPECIAL_TOKENS = {"pad_token": "<|pad|>", "eos_token": "<|end|>", "unk_token": "<|unk|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# A compact chat template with {% generation %} markers, so TRL's assistant-only loss can find the answers.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


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


# ---------------------------------------------------------------- tiny models built from a config

def train_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with role tokens and the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values()) + ROLE_TOKENS
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS, additional_special_tokens=ROLE_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_config(init: ModelInit, tokenizer) -> AutoConfig:
    """A config of the named MoE architecture; the three share most names but not the expert-count ones."""
    common = dict(
        vocab_size=len(tokenizer), hidden_size=init.hidden_size, num_hidden_layers=init.num_layers,
        num_attention_heads=init.num_heads, num_key_value_heads=init.num_kv_heads,
        num_experts_per_tok=init.experts_per_token, router_aux_loss_coef=init.router_aux_loss_coef,
        output_router_logits=True, max_position_embeddings=init.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    per_architecture = {
        "mixtral": dict(num_local_experts=init.num_experts, intermediate_size=init.intermediate_size),
        "qwen3_moe": dict(num_experts=init.num_experts, moe_intermediate_size=init.intermediate_size,
                          intermediate_size=init.intermediate_size, decoder_sparse_step=1,
                          head_dim=init.hidden_size // init.num_heads),
        "olmoe": dict(num_experts=init.num_experts, intermediate_size=init.intermediate_size),
    }
    return AutoConfig.for_model(init.architecture, **common, **per_architecture[init.architecture])


def training_texts(data_dir: Path):
    """Every message text of the prepared training files: what the tiny model's tokenizer learns from."""
    for name in ("sft/train.jsonl", "preference/train.jsonl"):
        path = Path(data_dir) / name
        if not path.is_file():
            continue
        with open(path) as handle:
            for line in handle:
                row = json.loads(line)
                for key in ("messages", "prompt", "chosen", "rejected"):
                    for message in row.get(key) or []:
                        yield message["content"]


def build_base(recipe: Recipe, force: bool = False) -> Path:
    """The `base` stage for `model.init` recipes: train a tokenizer on the prepared data, build and save the model."""
    data = require_complete(recipe.run_path, "data", needed_by="base")
    stage = Stage(recipe.run_path, "base", inputs={"init": recipe.section_dict("model")["init"],
                                                     "seed": recipe.seed, "data": data["fingerprint"]})
    if not stage.begin(force):
        return stage.final
    # One process builds and saves the model; in a multi-process run the others wait in commit, then load it.
    outputs = write_base_model(recipe, stage.work) if distributed.is_main_process() else {}
    return stage.commit(outputs)


def write_base_model(recipe: Recipe, folder: Path) -> dict:
    init = recipe.model.init
    tokenizer = train_tokenizer(training_texts(recipe.run_path / "data"), init.vocab_size)
    seed_everything(recipe.seed)
    model = AutoModelForCausalLM.from_config(init_config(init, tokenizer), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[base] built a {init.architecture} model with {n_params:,} parameters and a {len(tokenizer)}-token tokenizer.")
    return {"kind": "full", "parameters": n_params}


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
        return train_tokenizer(texts, recipe.model.init.vocab_size)
    location = base_location(recipe)
    tokenizer = AutoTokenizer.from_pretrained(location, **hub_kwargs(recipe, location))
    if tokenizer.chat_template is None:
        raise ValueError(f"{location} has no chat template; pick an instruct/chat tokenizer or add one to the model folder.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pretrained(recipe: Recipe, location: str):
    return AutoModelForCausalLM.from_pretrained(
        location, dtype=resolve_dtype(recipe.model.dtype), experts_implementation=experts_kernel(recipe.model),
        **hub_kwargs(recipe, location),
    )


def load_quantized(recipe: Recipe, name: str):
    """A full-weights stage (`base`, or a full SFT) loaded for QLoRA: Linears through bitsandbytes, experts in NF4.

    It loads on the CPU (memory-mapped) and quantizes expert by expert onto the GPU when there is one, so the GPU
    only ever holds the 4-bit model.
    """
    from finetune import expert_quant

    location = base_location(recipe) if name == "base" else str(recipe.run_path / name)
    quantization = recipe.model.quantization
    dtype = resolve_dtype(recipe.model.dtype)
    compute_dtype = dtype if quantization.compute_dtype == "auto" else resolve_dtype(quantization.compute_dtype)
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
    from peft import PeftModel

    parent = load_stage_model(recipe, outputs["parent"])
    return distributed.merge_and_unload(PeftModel.from_pretrained(parent, str(folder)))


def load_for_inference(recipe: Recipe, name: str):
    """(model, tokenizer) ready for generation: a stage of this run, or any local path or hub id (adapters too)."""
    if name in ("base", "sft", "dpo"):
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
        from peft import PeftModel

        base, tokenizer = load_adapter_base(adapter_dir, resolve_dtype(recipe.model.dtype), trust)
        model = PeftModel.from_pretrained(base, location).merge_and_unload()
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
