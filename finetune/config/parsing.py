"""Reading a recipe: YAML (and dotted `key=value` overrides) into the typed dataclasses of finetune/config/recipe.py.

An unknown key fails naming the file, the key and the closest valid key; a value of the wrong type fails naming the
key and the expected type. `sft:` and `dpo:` take any field of TRL's SFTConfig / DPOConfig, checked against those
classes. A credential anywhere is refused first (finetune/config/secrets.py); the values of every section are then
checked by finetune/config/validation.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from finetune.config.chat_template import resolve_chat_template
from finetune.config.section_fields import to_dict
from finetune.config.recipe import TRAINING_STAGES, Recipe, RecipeError
from finetune.config.secrets import refuse_credentials
from finetune.config.trainer_fields import trainer_fields
from finetune.config.validation import validate_recipe


# TRL fields that moetune owns or cannot honour, with the moetune way to get what they do. Set in sft:/dpo:, they
# would be silently overridden (output_dir, seed) or fail hours later (push_to_hub at the end of training, into a
# repository named after the work folder; resume_from_checkpoint, which moetune passes itself).
HUB_WAY = "the recipe's hub: section (hub.push, hub.repo_id, hub.private, hub.stages) or `moetune push`"
MANAGED_TRAINER_KEYS = {
    "output_dir": "run_dir (each stage writes run_dir/<stage>)",
    "seed": "the recipe's top-level seed",
    "push_to_hub": HUB_WAY, "hub_model_id": HUB_WAY, "hub_strategy": HUB_WAY, "hub_private_repo": HUB_WAY,
    "hub_always_push": HUB_WAY, "hub_revision": HUB_WAY,
    "resume_from_checkpoint": "re-running the same command: it resumes from the newest usable checkpoint in "
                              "run_dir/.<stage>.partial by itself",
    "local_rank": "`--accelerate CONFIG` (or a launcher), which sets each process's rank",
}


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
    refuse_credentials(raw, source)  # first: no later message may repeat a secret's value
    recipe = from_dict(Recipe, raw, source, "")
    recipe.source = source
    if recipe.model.chat_template is not None:
        try:
            recipe.model.chat_template = resolve_chat_template(recipe.model.chat_template, recipe.base_dir, source)
        except ValueError as error:
            raise RecipeError(str(error)) from None
    for stage in TRAINING_STAGES:
        validate_trainer_section(getattr(recipe, stage), stage, source)
    validate_recipe(recipe)
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
        # YAML reads 5e-4 (no dot) as a string; accept any number a user would write. An integer stays one, so that
        # `logging_steps: 25` (a float field in TrainingArguments) is saved as 25, not 25.0.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
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


def trainer_config_name(stage: str) -> str:
    """The name of TRL's config class for a trainer section (SFTConfig for sft:), known without importing TRL."""
    return Recipe.__dataclass_fields__[stage].metadata["trl_config"]


def trainer_config_class(stage: str) -> type:
    import trl  # imported only when a trainer section is read: it pulls in the training stack

    return getattr(trl, trainer_config_name(stage))


def validate_trainer_section(section: dict[str, Any], stage: str, source: str) -> None:
    """Check sft:/dpo: keys against TRL's config dataclass and coerce numbers written as strings."""
    config_name = trainer_config_name(stage)
    fields = trainer_fields(config_name)
    for key, value in list(section.items()):
        if key in MANAGED_TRAINER_KEYS:
            raise RecipeError(f"{source}: {stage}.{key} is TRL's, but moetune does that itself: remove it and use "
                              f"{MANAGED_TRAINER_KEYS[key]}.")
        if key not in fields:
            raise RecipeError(unknown_key_message(source, f"{stage}.{key}", key, list(fields)) +
                              f" ({stage}: takes the fields of TRL's {config_name}.)")
        section[key] = coerce_trainer_value(fields[key], value, source, f"{stage}.{key}")


def coerce_trainer_value(text: str, value: Any, source: str, path: str) -> Any:
    """`text`: a field's annotation ('float | None'); convert the common scalar cases, pass the rest to TRL."""
    if value is None:
        return value
    for name, hint in (("float", float), ("int", int), ("bool", bool)):
        if text.split("|")[0].strip() == name:
            return coerce_scalar(hint, value, source, path)
    return value


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
