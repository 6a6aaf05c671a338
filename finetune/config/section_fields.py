"""The one way recipe sections declare their keys: a dataclass field whose help text is the documentation."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, NamedTuple


def help_field(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None) -> Any:
    """A dataclass field documented for `moetune <stage> --help` and the README."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def to_dict(obj: Any) -> Any:
    """A recipe (or section) as plain YAML-ready data, for fingerprints and the saved resolved recipe."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.metadata.get("internal")}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


class FieldDoc(NamedTuple):
    key: str  # dotted: model.lora.r
    default: Any  # the default value; a nested section's own fields follow it as their own rows
    help: str


def describe_fields(cls: type, prefix: str = "") -> list[FieldDoc]:
    """Every recipe key of a section, nested sections included, with its default and help: for --help and the
    README's key table."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}{f.name}"
        nested = [a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)) if dataclasses.is_dataclass(a)]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append(FieldDoc(key, default, f.metadata.get("help", "")))
        if nested:
            rows.extend(describe_fields(nested[0], key + "."))
    return rows
