"""The `data:` section of a recipe: which sources to read and how to turn them into training files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.config.section_fields import help_field

# The source formats (data_prep/formats.py converts each), those generated rather than read, and the pairings of
# the scored format: named here so that the recipe is checked when it is read, before any stage runs.
FORMATS = ("sft", "preference", "hh_rlhf", "scored", "oasst", "onpolicy", "synthetic")
GENERATED_FORMATS = ("synthetic", "onpolicy")  # need no path or dataset
PAIRINGS = ("best_vs_worst", "best_vs_random")
CHOICES = {"on_error": ("fail", "skip"), "dedup": ("exact", "prompt", "none")}


@dataclass
class SourceConfig:
    format: str = help_field(
        help="How rows are laid out: sft (messages), preference (TRL's paired formats), hh_rlhf (Human/Assistant "
        "transcripts), scored (UltraFeedback-style scored completions), oasst (OpenAssistant message trees), "
        "onpolicy (sample K completions from a model, judge them), synthetic (the built-in demo task)."
    )
    path: str | None = help_field(
        None, help="Local file (jsonl, json, parquet, csv); a relative path is relative to the recipe file's folder."
    )
    dataset: str | None = help_field(None, help="Hub dataset id, e.g. Anthropic/hh-rlhf (read by streaming).")
    config: str | None = help_field(None, help="Hub dataset configuration (subset) name.")
    data_dir: str | None = help_field(
        None, help="Folder of the hub dataset to read, for datasets whose subsets are folders (Anthropic/hh-rlhf: "
        "helpful-base, harmless-base, ...).")
    split: str = help_field("train", help="Hub dataset split to read.")
    revision: str | None = help_field(None, help="Hub dataset revision (branch, tag or commit).")
    columns: dict[str, str] = help_field(
        factory=dict, help="Renames applied to every row before conversion: {name the format expects: column in the source}."
    )
    weight: float = help_field(1.0, help="Share of this source's examples kept (0 < weight <= 1), drawn with the recipe seed.")
    max_rows: int | None = help_field(None, help="Keep at most this many examples from this source (reading stops there).")
    sft_from_chosen: bool = help_field(
        False, help="Also write an SFT conversation (prompt + chosen) for every preference pair of this source."
    )
    options: dict[str, Any] = help_field(
        factory=dict,
        help="Format-specific options, e.g. synthetic: {sft: 4000, pairs: 2000, questions: 300}; "
        "scored: {pairing: best_vs_worst, min_margin: 1.0}; onpolicy: {model: PATH, k: 4, judge: programmatic}.",
    )


@dataclass
class DecontaminationConfig:
    question_files: list[str] = help_field(
        factory=list, help="MT-Bench-format question files (jsonl with 'turns'): paths relative to the recipe file's folder, or "
        "URLs (downloaded once into ~/.cache/moetune, or $MOETUNE_CACHE)."
    )
    ngram: int = help_field(8, help="Words per n-gram compared between training prompts and eval questions.")
    threshold: float = help_field(
        0.5, help="Drop a training row when this share of any eval question turn's n-grams appears in its user text."
    )


@dataclass
class DataConfig:
    sources: list[SourceConfig] = help_field(factory=list, help="Sources to read and mix.")
    test_size: float = help_field(0.05, help="Share of rows held out for the test split (chosen by a hash of the prompt).")
    on_error: str = help_field(
        "fail", help="A malformed row: fail (stop, naming the first bad row and counting the rest) or skip (drop and report)."
    )
    dedup: str = help_field(
        "prompt",
        help="Drop duplicates: exact (identical rows), prompt (also rows whose normalized prompt was seen; "
        "use exact for sources with several pairs per prompt, like OpenAssistant), none.",
    )
    max_length: int | None = help_field(
        None, help="Drop rows longer than this many tokens after chat templating with the model's tokenizer "
        "(model.name_or_path recipes only: a model.init tokenizer is trained on this data later); null: keep all."
    )
    decontamination: DecontaminationConfig | None = help_field(
        None, help="Drop training rows that overlap eval questions; null: no check."
    )
