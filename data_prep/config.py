"""The `data:` section of a recipe: which sources to read and how to turn them into training files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.fields import help_field


@dataclass
class SourceConfig:
    format: str = help_field(help="How rows are laid out: synthetic (the built-in demo task), ...")
    path: str | None = help_field(None, help="Local file (jsonl, json, parquet, csv).")
    options: dict[str, Any] = help_field(factory=dict, help="Format-specific options, e.g. synthetic: {sft: 4000, pairs: 2000, questions: 300}.")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = help_field(factory=list, help="Sources to read and mix.")
    test_size: float = help_field(0.05, help="Share of rows held out for the test split.")
