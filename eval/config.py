"""The `eval:` section of a recipe: which models answer which questions, and who judges."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.fields import help_field


@dataclass
class JudgeConfig:
    type: str = help_field("programmatic", help="programmatic (checks answers of the synthetic task), openai, local.")


@dataclass
class EvalConfig:
    models: list[str] = help_field(factory=lambda: ["base", "sft", "dpo"], help="Models to compare: stage names of this run (base, sft, dpo), local paths or hub ids.")
    question_file: str | None = help_field(None, help="MT-Bench-format question.jsonl; default: run_dir/data/questions.jsonl from the prep stage.")
    judge: JudgeConfig = help_field(factory=JudgeConfig, help="The judge.")
    max_new_tokens: int = help_field(64, help="Longest answer generated per turn.")
    batch_size: int = help_field(32, help="Questions answered together in one generate() call.")
