"""Checking a parsed recipe's values before any work starts, every section (model, data, eval, hub, ...) in one place
with one error type (RecipeError), so that any command refuses a bad value in any section: choices, combinations,
what each needs, and the one check of a Hub repository id."""

from __future__ import annotations

import difflib
import re

from finetune.config.data import CHOICES, FORMATS, GENERATED_FORMATS, PAIRINGS, DataConfig
from finetune.config.evaluation import JUDGE_MODES, JUDGE_TYPES, EvalConfig
from finetune.core import families
from finetune.config.recipe import (TRAINING_STAGES, HubConfig, LoraConfig, ModelConfig, ModelInit, Recipe,
                                    RecipeError, RoutingConfig)

LORA_ROLES = ("attention", "experts", "shared_experts", "dense_mlp", "router", "all")
DTYPES = ("auto", "float32", "bfloat16", "float16")
EXPERT_KERNELS = ("auto", "eager", "grouped_mm", "batched_mm")


def validate_recipe(recipe: Recipe) -> None:
    source = recipe.source
    validate_model(recipe.model, source)
    validate_data(recipe.data, source)
    validate_data_needs(recipe)
    validate_hub(recipe.hub, source)
    for key in ("bias_update_rate", "router_z_loss_coef"):
        if getattr(recipe.balancing, key) < 0:
            raise RecipeError(f"{source}: balancing.{key} is {getattr(recipe.balancing, key)}; it must be >= 0 (0 is off).")
    validate_routing(recipe.routing, source)
    validate_plan(recipe, source)
    validate_eval(recipe.eval, source)


MEMORY_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt])(i?)(b?)\s*", re.IGNORECASE)


def parse_memory(text: str) -> float:
    """Bytes of a size such as 24GiB, 24G (powers of 1024) or 80GB (powers of 1000)."""
    match = MEMORY_SIZE.fullmatch(str(text))
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"{text!r} is not a memory size; write it like 24GiB, 80GB or 512MiB.")
    base = 1000 if match[4] and not match[3] else 1024
    return float(match[1]) * base ** ("kmgt".index(match[2].lower()) + 1)


def validate_plan(recipe: Recipe, source: str) -> None:
    if recipe.plan.memory is not None:
        try:
            parse_memory(str(recipe.plan.memory))
        except ValueError as error:
            raise RecipeError(f"{source}: plan.memory: {error}") from None
    if recipe.plan.mfu is not None and not 0 < recipe.plan.mfu <= 1:
        raise RecipeError(f"{source}: plan.mfu is {recipe.plan.mfu}; it must be a fraction in (0, 1], e.g. 0.25.")


def validate_routing(routing: RoutingConfig, source: str) -> None:
    for key in ("probe_sequences", "pair_sample"):
        if getattr(routing, key) < 0:
            raise RecipeError(f"{source}: routing.{key} is {getattr(routing, key)}; it must be >= 0 (0 is off), e.g. 256.")
    check_positive(routing.alarm_logs, source, "routing.alarm_logs", example="3")
    if routing.max_overhead is not None and not 0 < routing.max_overhead <= 1:
        raise RecipeError(f"{source}: routing.max_overhead is {routing.max_overhead}; it must be in (0, 1], e.g. 0.05 "
                          f"(5% of training time), or null to probe every sequence.")
    if not 0 <= routing.dead_load < 1:
        raise RecipeError(f"{source}: routing.dead_load is {routing.dead_load}; it must be in [0, 1) (a fraction of the "
                          f"uniform share), e.g. 0.1.")
    if routing.hot_load <= 1:
        raise RecipeError(f"{source}: routing.hot_load is {routing.hot_load}; it must be above 1 (a multiple of the "
                          f"uniform share), e.g. 3.")


def validate_model(model: ModelConfig, source: str) -> None:
    if (model.name_or_path is None) == (model.init is None):
        raise RecipeError(f"{source}: set exactly one of model.name_or_path (a hub id or path) or model.init (a tiny model).")
    check_choice(model.dtype, DTYPES, source, "model.dtype")
    check_choice(model.experts_implementation, EXPERT_KERNELS, source, "model.experts_implementation")
    if model.init is not None:
        validate_init(model.init, source)
    if model.quantization is not None:
        validate_quantization(model, source)
    if model.lora is not None:
        validate_lora(model.lora, source)
    if model.expert_parallel != 1:
        validate_expert_parallel(model, source)


def validate_init(init: ModelInit, source: str) -> None:
    if init.architecture not in families.ARCHITECTURES + tuple(families.ALIASES):  # the registry's: no look-up
        check_choice(init.architecture, families.moe_model_types() + tuple(families.ALIASES), source,
                     "model.init.architecture")
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "num_experts",
                 "experts_per_token", "max_position_embeddings", "vocab_size"):
        check_positive(getattr(init, name), source, f"model.init.{name}")
    if init.experts_per_token > init.num_experts:
        raise RecipeError(f"{source}: model.init.experts_per_token must be <= model.init.num_experts.")
    if init.hidden_size % init.num_heads or init.num_heads % init.num_kv_heads:
        raise RecipeError(f"{source}: model.init.hidden_size ({init.hidden_size}) must be a multiple of num_heads "
                          f"({init.num_heads}), and num_heads a multiple of num_kv_heads ({init.num_kv_heads}).")


def validate_lora(lora: LoraConfig, source: str) -> None:
    """What peft would reject only once a stage has loaded the model."""
    if not lora.targets:
        raise RecipeError(f"{source}: model.lora.targets is empty; list roles ({', '.join(LORA_ROLES)}) or set lora: null.")
    for role in lora.targets:
        check_choice(role, LORA_ROLES, source, "model.lora.targets")
    for stage in lora.stages:
        check_choice(stage, TRAINING_STAGES, source, "model.lora.stages")
    check_positive(lora.r, source, "model.lora.r", example="16")
    check_positive(lora.alpha, source, "model.lora.alpha", example="2 * r")
    if not 0 <= lora.dropout < 1:
        raise RecipeError(f"{source}: model.lora.dropout is {lora.dropout}; it must be in [0, 1), e.g. 0.05.")


def validate_expert_parallel(model: ModelConfig, source: str) -> None:
    """What the pinned libraries cannot combine with experts split across processes (docs/scaling-out.md)."""
    check_positive(model.expert_parallel, source, "model.expert_parallel", example="8 (one per GPU)")
    if model.quantization is not None:
        raise RecipeError(f"{source}: model.expert_parallel and model.quantization do not combine: transformers "
                          f"splits the experts as DTensors while loading, and moetune's NF4 experts replace those "
                          f"parameters after loading. Split the experts (full precision) or quantize them (one "
                          f"process holds them all), not both.")
    if model.lora is not None and {"router", "all"} & set(model.lora.targets):
        raise RecipeError(f"{source}: model.expert_parallel with model.lora.targets {model.lora.targets}: LoRA on the "
                          f"router weight (PEFT's target_parameters) adds a plain tensor to a weight FSDP2 holds "
                          f"split ('got mixed torch.Tensor and DTensor'); the experts, attention, shared experts and "
                          f"dense FFNs take LoRA under expert parallelism. Name those roles instead of router (or "
                          f"all), or set expert_parallel: 1.")


def check_positive(value: int, source: str, path: str, example: str | None = None) -> None:
    if value < 1:
        hint = f", e.g. {example}" if example else ""
        raise RecipeError(f"{source}: {path} is {value}; it must be a positive integer{hint}.")


def validate_data(data: DataConfig, source: str) -> None:
    """A data section that cannot work, refused before any file is read."""
    for key, choices in CHOICES.items():
        check_choice(getattr(data, key), choices, source, f"data.{key}")
    if not 0 <= data.test_size < 1:
        raise RecipeError(f"{source}: data.test_size must be in [0, 1), got {data.test_size}.")
    for index, item in enumerate(data.sources):
        where = f"{source}: data.sources[{index}]"
        check_choice(item.format, FORMATS, source, f"data.sources[{index}].format")
        if item.format not in GENERATED_FORMATS and (item.path is None) == (item.dataset is None):
            raise RecipeError(f"{where}: set exactly one of path (a local file) or dataset (a hub id).")
        if not 0 < item.weight <= 1:
            raise RecipeError(f"{where}.weight must be in (0, 1], got {item.weight}; use max_rows to cap a source.")
        if item.format == "onpolicy" and "model" not in item.options:
            raise RecipeError(f"{where}.options.model is required: the model to sample completions from.")
        if item.options.get("pairing", PAIRINGS[0]) not in PAIRINGS:
            raise RecipeError(f"{where}.options.pairing must be one of {', '.join(PAIRINGS)}.")


ENVIRONMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def validate_eval(config: EvalConfig, source: str) -> None:
    """An eval section that cannot run, refused before any stage (eval comes last, after hours of training)."""
    judge = config.judge
    check_choice(judge.type, JUDGE_TYPES, source, "eval.judge.type")
    check_choice(judge.mode, JUDGE_MODES, source, "eval.judge.mode")
    if not config.models:
        raise RecipeError(f"{source}: eval.models is empty; list the models to evaluate, e.g. [base, sft, dpo].")
    if judge.type != "programmatic" and (judge.model is None or judge.prompt_file is None):
        raise RecipeError(f"{source}: eval.judge.type {judge.type} needs eval.judge.model and eval.judge.prompt_file "
                          "(FastChat's judge_prompts.jsonl).")
    if judge.api_key_env is not None and not ENVIRONMENT_NAME.fullmatch(judge.api_key_env):
        # Not repeated: it may be the key itself, pasted where its variable's name goes.
        raise RecipeError(f"{source}: eval.judge.api_key_env is not the name of an environment variable; it names "
                          f"the variable that holds the key (e.g. OPENAI_API_KEY), never the key itself.")
    if judge.mode == "pairwise":
        if judge.type == "programmatic":
            raise RecipeError(f"{source}: eval.judge.mode pairwise needs a model judge (type openai or local).")
        if judge.baseline not in config.models:
            raise RecipeError(f"{source}: eval.judge.baseline {judge.baseline!r} must be one of eval.models "
                              f"({', '.join(config.models)}).")


def validate_data_needs(recipe: Recipe) -> None:
    """Data settings that need a model the recipe does not have when prep runs."""
    if recipe.data.max_length is not None and recipe.model.init is not None:
        raise RecipeError(
            f"{recipe.source}: data.max_length filters rows by the model's token count, but a model.init recipe "
            f"trains its tokenizer on the prepared data afterwards (the base stage), so there is nothing to count "
            f"with. Remove data.max_length; sft.max_length and dpo.max_length still truncate what is trained on.")


def validate_hub(hub: HubConfig, source: str) -> None:
    for stage in hub.stages:
        check_choice(stage, TRAINING_STAGES, source, "hub.stages")
    if not hub.push:
        return
    if not hub.repo_id:
        raise RecipeError(f"{source}: hub.push is true but hub.repo_id is not set; name the repository, "
                          f"e.g. hub.repo_id=my-org/my-model-{{stage}}.")
    for stage in hub.stages:
        check_repo_id(hub.repo_for(stage), f"{source}: hub.repo_id", example="my-org/mixtral-{stage}")
    if len(hub.stages) > 1 and "{stage}" not in hub.repo_id:
        # One repository would hold only the last stage pushed: dpo's upload replaces sft's files.
        raise RecipeError(f"{source}: hub.push uploads {' and '.join(hub.stages)} to one repository "
                          f"{hub.repo_id}, where each replaces the other. Put {{stage}} in hub.repo_id (e.g. "
                          f"{hub.repo_id}-{{stage}}) or push a single stage (hub.stages: [dpo]).")


def check_repo_id(repo_id: str, where: str, example: str = "my-org/mixtral-dpo") -> str:
    """huggingface_hub's own check of a repository id (hub.repo_id before any training that would end in a refused
    upload; `moetune push --repo-id`), as an error naming where it was given and an example."""
    problem = invalid_repo_id(repo_id)
    if problem:
        raise RecipeError(f"{where} gives {repo_id!r}, which is not a valid Hub repository id, e.g. {example}: "
                          f"{problem}")
    return repo_id


def invalid_repo_id(repo_id: str) -> str | None:
    """What huggingface_hub's own validator finds wrong with a repository id, or None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        return str(error)
    return None


def validate_quantization(model: ModelConfig, source: str) -> None:
    if model.quantization.bits not in (4, 8):
        raise RecipeError(f"{source}: model.quantization.bits is {model.quantization.bits}; choose 4 or 8.")
    check_choice(model.quantization.compute_dtype, DTYPES, source, "model.quantization.compute_dtype")
    if model.lora is None:
        raise RecipeError(f"{source}: model.quantization needs model.lora: a quantized base can only train adapters. "
                          f"Add a lora: section or set quantization: null.")


def check_choice(value: str, choices: tuple[str, ...], source: str, path: str) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"{source}: {path} is '{value}'; choose one of {', '.join(choices)}.{hint}")
