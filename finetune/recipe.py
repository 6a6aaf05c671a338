"""Recipes: one YAML file per pipeline, parsed into typed, validated config objects.

A recipe has a section per concern (model, data, sft, dpo, eval, hub) and a `run_dir` where every stage writes.
Validation happens before any work starts: an unknown key fails naming the file, the key and the closest valid
key; a value of the wrong type fails naming the key and the expected type. `sft:` and `dpo:` take any field of
TRL's SFTConfig / DPOConfig, checked against those classes, so TRL users' knowledge carries over.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_prep.config import DataConfig
from eval.config import EvalConfig, check_eval_config
from finetune.fields import help_field


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the key and the fix."""


@dataclass
class ModelInit:
    """A tiny MoE model built from a config, for CPU demos and tests (no download)."""

    architecture: str = help_field("mixtral", help="MoE architecture: mixtral, qwen3_moe or olmoe.")
    hidden_size: int = help_field(64, help="Width of the residual stream.")
    intermediate_size: int = help_field(128, help="Width of each expert's FFN.")
    num_layers: int = help_field(2, help="Number of decoder layers.")
    num_heads: int = help_field(4, help="Attention heads.")
    num_kv_heads: int = help_field(2, help="Key/value heads (grouped-query attention).")
    num_experts: int = help_field(4, help="Experts per MoE layer.")
    experts_per_token: int = help_field(2, help="Experts each token is routed to (top-k).")
    router_aux_loss_coef: float = help_field(0.01, help="Load-balancing loss weight stored in the model config.")
    max_position_embeddings: int = help_field(512, help="Longest sequence the model accepts.")
    vocab_size: int = help_field(160, help="Target vocabulary size of the tokenizer trained on the recipe's data.")


@dataclass
class LoraConfig:
    """LoRA adapters chosen by role, so the router stays frozen unless asked for."""

    targets: list[str] = help_field(
        factory=lambda: ["attention", "experts"],
        help="Roles to adapt: attention, experts (fused 3-D expert weights), router, all. "
        "The router is trained only when listed (or with 'all').",
    )
    r: int = help_field(16, help="LoRA rank (shared across the experts of one fused parameter).")
    alpha: int = help_field(32, help="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = help_field(0.0, help="LoRA dropout; forced to 0 on expert targets, which refuse dropout.")
    stages: list[str] = help_field(
        factory=lambda: ["sft", "dpo"],
        help="Stages that train adapters; the others fine-tune all weights (e.g. [dpo] after a full SFT).",
    )


@dataclass
class QuantizationConfig:
    """QLoRA: the frozen base of adapter-training stages in 4 (or 8) bits, the fused experts included."""

    bits: int = help_field(
        4, help="Linear layers (attention) through bitsandbytes: 4 (NF4) or 8 (LLM.int8). The fused expert weights "
        "are stored in NF4 by moetune in both cases; the router and lm_head stay in full precision.",
    )
    double_quant: bool = help_field(
        True, help="Quantize the 4-bit block scales again (about 0.4 bits per weight less), experts included.",
    )
    compute_dtype: str = help_field(
        "auto", help="dtype 4-bit weights are dequantized to for each matmul: auto (the model's dtype), float32, "
        "bfloat16, float16.",
    )


@dataclass
class ModelConfig:
    name_or_path: str | None = help_field(None, help="Hub id or local path of the base model.")
    revision: str | None = help_field(None, help="Hub revision (branch, tag or commit) of the base model.")
    init: ModelInit | None = help_field(
        None, help="Build a tiny model of a named MoE architecture from a config instead of loading one."
    )
    trust_remote_code: bool = help_field(
        False, help="Run Python code shipped with a hub model. Off: only turn it on for repositories you trust."
    )
    dtype: str = help_field(
        "auto", help="Weights dtype: auto (fp32 on CPU, bf16 on GPUs that support it, else fp16), float32, bfloat16."
    )
    experts_implementation: str = help_field(
        "auto", help="Expert kernel: auto (grouped_mm), eager, grouped_mm, batched_mm (never on CPU: 30x slower). "
        "Quantized experts (model.quantization) use moetune's NF4 kernel instead."
    )
    lora: LoraConfig | None = help_field(None, help="LoRA adapters; null means full fine-tuning.")
    quantization: QuantizationConfig | None = help_field(
        None, help="Load the base of the stages that train adapters quantized (QLoRA), experts included; "
        "null keeps full precision. Needs model.lora.",
    )

    def lora_for(self, stage: str) -> LoraConfig | None:
        """The adapter settings a training stage uses, or None for full fine-tuning."""
        return self.lora if self.lora is not None and stage in self.lora.stages else None


@dataclass
class SpeedConfig:
    """Levers that make training faster without changing its math (tests compare each with TRL; see `make bench`)."""

    padding_free: bool = help_field(
        True, help="SFT and DPO: batches without padding, sequences end to end in one row, attention within each.")
    share_prompt: bool = help_field(
        True, help="DPO with padding_free: each pair's prompt computed once, then chosen, then rejected "
        "(which attends to the prompt, not to chosen).")
    reference_cache: bool = help_field(
        True, help="DPO: reference log-probs computed in one pass before training (TRL's precompute_ref_log_probs, "
        "which dpo: can still set) and cached by model, tokens and batch layout, so a second epoch, a re-run, a "
        "resumed run or a sweep over beta reuses them; full fine-tuning then loads no reference copy.")


@dataclass
class HubConfig:
    push: bool = help_field(False, help="Push each of `stages` to the Hub as soon as it completes (the upload runs "
                            "while the next stages train; the command ends once it is done).")
    repo_id: str | None = help_field(
        None, help="Hub repository, e.g. my-org/mixtral-hh-{stage}-lora; {stage} becomes the stage name, so "
        "that each stage gets its own repository (needed when more than one stage is pushed).")
    stages: list[str] = help_field(factory=lambda: ["sft", "dpo"], help="Training stages pushed when push is true.")
    private: bool = help_field(True, help="Create the repository as private.")

    def repo_for(self, stage: str) -> str:
        return self.repo_id.replace("{stage}", stage)


@dataclass
class CheckpointConfig:
    """When SFT and DPO save checkpoints to resume from, on top of TRL's save_strategy/save_steps."""

    every_minutes: float | None = help_field(
        30, help="Save a checkpoint whenever this many minutes have passed since the last one, so a kill loses at "
        "most that much (null or 0: only on the step schedule and on SIGTERM/Ctrl-C, which always save). Steps come "
        "from sft:/dpo: save_strategy and save_steps (off by default); their save_total_limit (default 2) keeps the "
        "last N checkpoints of either kind. Not an input of the result: change it freely between interruption and "
        "resume.",
    )


@dataclass
class Recipe:
    run_dir: str = help_field(help="Folder where every stage writes: run_dir/{data,base,sft,dpo,eval}.")
    model: ModelConfig = help_field(factory=ModelConfig, help="The base model.")
    data: DataConfig = help_field(factory=DataConfig, help="Training data sources (the prep stage).")
    sft: dict[str, Any] = help_field(factory=dict, help="Any field of TRL's SFTConfig.")
    dpo: dict[str, Any] = help_field(factory=dict, help="Any field of TRL's DPOConfig.")
    eval: EvalConfig = help_field(factory=EvalConfig, help="Evaluation (the eval stage).")
    hub: HubConfig = help_field(factory=HubConfig, help="Pushing results to the Hugging Face Hub.")
    speed: SpeedConfig = help_field(factory=SpeedConfig, help="Training speed levers (math unchanged).")
    checkpoints: CheckpointConfig = help_field(factory=CheckpointConfig, help="Checkpoint schedule of SFT and DPO.")
    seed: int = help_field(42, help="Seed for data mixing, splits, initialisation and training.")
    # Where the recipe came from, for error messages and resolving relative paths; not a YAML key.
    source: str = field(default="<recipe>", metadata={"internal": True})

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    @property
    def base_dir(self) -> Path:
        """The recipe file's folder: relative paths in `data:` and `eval:` start here, wherever moetune runs from."""
        return Path(self.source).resolve().parent

    def section_dict(self, name: str) -> dict[str, Any]:
        return to_dict(getattr(self, name))

    def model_inputs(self, stage: str) -> dict[str, Any]:
        """The model settings a training stage depends on (its own adapter settings, not the other stage's)."""
        return {**self.section_dict("model"), "lora": to_dict(self.model.lora_for(stage))}


# TRL fields that moetune sets itself from the recipe; setting them in sft:/dpo: would be silently overridden.
MANAGED_TRAINER_KEYS = {"output_dir": "run_dir", "seed": "seed"}


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply dotted `key=value` overrides, and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file. Recipes live in recipes/, e.g. recipes/tiny-moe.yaml.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model:, data:, sft:, ...), not {type(raw).__name__}.")
    for override in overrides:
        apply_override(raw, override, str(path))
    return parse_recipe(raw, str(path))


def parse_recipe(raw: dict[str, Any], source: str) -> Recipe:
    recipe = from_dict(Recipe, raw, source, "")
    recipe.source = source
    validate_trainer_section(recipe.sft, "sft", source)
    validate_trainer_section(recipe.dpo, "dpo", source)
    validate_model(recipe.model, source)
    validate_hub(recipe.hub, source)
    try:
        check_eval_config(recipe.eval)
    except ValueError as error:
        raise RecipeError(f"{source}: {error}") from None
    return recipe


def apply_override(raw: dict[str, Any], override: str, source: str) -> None:
    """`sft.learning_rate=5e-4` sets raw["sft"]["learning_rate"]; the value is parsed as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override '{override}': write overrides as dotted.key=value, e.g. sft.max_steps=50.")
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override '{override}': {part} in {source} is not a section.")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def from_dict(cls: type, data: Any, source: str, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with a 'did you mean'."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {where or 'the recipe'} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise RecipeError(unknown_key_message(source, path, key, list(known)))
        values[key] = coerce(hints[key], value, source, path)
    missing = [
        name for name, f in known.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RecipeError(f"{source}: {where + '.' if where else ''}{missing[0]} is required.")
    return cls(**values)


def unknown_key_message(source: str, path: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(valid))}."
    return f"{source}: unknown key '{path}'.{hint}"


def coerce(hint: Any, value: Any, source: str, path: str) -> Any:
    """Check (and gently convert) one YAML value against a type hint."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for candidate in inner:
            try:
                return coerce(candidate, value, source, path)
            except RecipeError as error:
                errors.append(error)
        raise errors[0]
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, {} if value is None else value, source, path)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [coerce(args[0], item, source, path) for item in items] if args else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: {path} must be a mapping, got {value!r}.")
        return value
    return coerce_scalar(hint, value, source, path)


def coerce_scalar(hint: Any, value: Any, source: str, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        # YAML reads 5e-4 (no dot) as a string; accept any number a user would write.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise RecipeError(f"{source}: {path} must be {TYPE_NAMES.get(hint, hint)}, got {value!r}.")


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def trainer_config_class(stage: str) -> type:
    if stage == "sft":
        from trl import SFTConfig

        return SFTConfig
    from trl import DPOConfig

    return DPOConfig


def validate_trainer_section(section: dict[str, Any], stage: str, source: str) -> None:
    """Check sft:/dpo: keys against TRL's config dataclass and coerce numbers written as strings."""
    config_class = trainer_config_class(stage)
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    for key, value in list(section.items()):
        if key in MANAGED_TRAINER_KEYS:
            raise RecipeError(
                f"{source}: {stage}.{key} is set by moetune from the recipe's '{MANAGED_TRAINER_KEYS[key]}'; remove it."
            )
        if key not in fields:
            raise RecipeError(unknown_key_message(source, f"{stage}.{key}", key, list(fields)) +
                              f" ({stage}: takes the fields of TRL's {config_class.__name__}.)")
        section[key] = coerce_trainer_value(fields[key].type, value, source, f"{stage}.{key}")


def coerce_trainer_value(annotation: Any, value: Any, source: str, path: str) -> Any:
    """TRL annotates with strings like 'float | None'; convert the common scalar cases, pass the rest to TRL."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if value is None:
        return value
    for name, hint in (("float", float), ("int", int), ("bool", bool)):
        if text.split("|")[0].strip() == name:
            return coerce_scalar(hint, value, source, path)
    return value


ARCHITECTURES = ("mixtral", "qwen3_moe", "olmoe")
LORA_ROLES = ("attention", "experts", "router", "all")
DTYPES = ("auto", "float32", "bfloat16", "float16")
EXPERT_KERNELS = ("auto", "eager", "grouped_mm", "batched_mm")
TRAINING_STAGES = ("sft", "dpo")


def validate_model(model: ModelConfig, source: str) -> None:
    if (model.name_or_path is None) == (model.init is None):
        raise RecipeError(f"{source}: set exactly one of model.name_or_path (a hub id or path) or model.init (a tiny model).")
    check_choice(model.dtype, DTYPES, source, "model.dtype")
    check_choice(model.experts_implementation, EXPERT_KERNELS, source, "model.experts_implementation")
    if model.init is not None:
        check_choice(model.init.architecture, ARCHITECTURES, source, "model.init.architecture")
        if model.init.experts_per_token > model.init.num_experts:
            raise RecipeError(f"{source}: model.init.experts_per_token must be <= model.init.num_experts.")
    if model.quantization is not None:
        validate_quantization(model, source)
    if model.lora is not None:
        if not model.lora.targets:
            raise RecipeError(f"{source}: model.lora.targets is empty; list roles ({', '.join(LORA_ROLES)}) or set lora: null.")
        for role in model.lora.targets:
            check_choice(role, LORA_ROLES, source, "model.lora.targets")
        for stage in model.lora.stages:
            check_choice(stage, TRAINING_STAGES, source, "model.lora.stages")


def validate_hub(hub: HubConfig, source: str) -> None:
    for stage in hub.stages:
        check_choice(stage, TRAINING_STAGES, source, "hub.stages")
    if not hub.push:
        return
    if not hub.repo_id:
        raise RecipeError(f"{source}: hub.push is true but hub.repo_id is not set; name the repository, "
                          f"e.g. hub.repo_id=my-org/my-model-{{stage}}.")
    if len(hub.stages) > 1 and "{stage}" not in hub.repo_id:
        # One repository would hold only the last stage pushed: dpo's upload replaces sft's files.
        raise RecipeError(f"{source}: hub.push uploads {' and '.join(hub.stages)} to one repository "
                          f"{hub.repo_id}, where each replaces the other. Put {{stage}} in hub.repo_id (e.g. "
                          f"{hub.repo_id}-{{stage}}) or push a single stage (hub.stages: [dpo]).")


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


def to_dict(obj: Any) -> Any:
    """A recipe (or section) as plain YAML-ready data, for fingerprints and the saved resolved recipe."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.metadata.get("internal")}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, help) for every recipe key of a section, nested sections included, for --help."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}{f.name}"
        nested = [a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)) if dataclasses.is_dataclass(a)]
        rows.append((key, f.metadata.get("help", "")))
        if nested:
            rows.extend(describe_fields(nested[0], key + "."))
    return rows
