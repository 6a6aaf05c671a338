"""The `eval:` section of a recipe: which models answer which questions, and who judges."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.config.section_fields import help_field

# MT-Bench's sampling temperatures per category (FastChat gen_model_answer.py); other categories answer greedily.
MT_BENCH_TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "stem": 0.1,
    "humanities": 0.1,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "extraction": 0.0,
}

JUDGE_TYPES = ("programmatic", "openai", "local")
# How judge calls are made, not what they answer: not inputs of the eval, so they can change on a resumed run.
JUDGE_CALL_SETTINGS = ("max_concurrency", "timeout_seconds", "max_retries", "backoff_seconds")


class EvalInputError(ValueError):
    """Questions, prompts or reference answers that cannot be used; the message names the file (and line) and the fix."""

JUDGE_MODES = ("single", "pairwise")


@dataclass
class JudgeConfig:
    type: str = help_field(
        "programmatic",
        help="programmatic (scores the synthetic demo task's answers exactly), openai (any OpenAI-compatible chat "
        "endpoint) or local (a judge model loaded with transformers).",
    )
    mode: str = help_field(
        "single", help="single: rate every answer 1-10. pairwise: compare every model with `baseline`, in both orders."
    )
    baseline: str | None = help_field(None, help="Pairwise mode: the model (one of eval.models) the others are compared with.")
    model: str | None = help_field(
        None, help="openai: the judge model name sent to the endpoint (e.g. gpt-4). local: a path, hub id or stage name."
    )
    base_url: str = help_field(
        "https://api.openai.com/v1", help="openai: the endpoint's base URL; /chat/completions is appended."
    )
    api_key_env: str | None = help_field(
        "OPENAI_API_KEY", help="openai: NAME of the environment variable holding the API key (the key itself never goes in a recipe)."
    )
    prompt_file: str | None = help_field(
        None,
        help="Judge prompts in FastChat's judge_prompts.jsonl format (needed by openai and local judges), "
        "e.g. FastChat's fastchat/llm_judge/data/judge_prompts.jsonl: a path relative to the recipe file's folder "
        "or a URL (downloaded once into ~/.cache/moetune, or $MOETUNE_CACHE).",
    )
    reference_answer_file: str | None = help_field(
        None,
        help="Reference answers in FastChat's answer format (e.g. mt_bench/reference_answer/gpt-4.jsonl): a path "
        "relative to the recipe file's folder or a URL. Without it, a question's own `reference` list is used.",
    )
    reference_categories: list[str] = help_field(
        factory=lambda: ["math", "reasoning", "coding"],
        help="Categories judged with the reference-guided prompts when a reference exists.",
    )
    max_tokens: int = help_field(2048, help="Longest judgment the judge may write.")
    max_concurrency: int = help_field(8, help="openai: judge requests in flight at once.")
    timeout_seconds: float = help_field(120.0, help="openai: seconds to wait for one response.")
    max_retries: int = help_field(5, help="openai: retries after a timeout, HTTP 429 or 5xx before a judgment counts as an error.")
    backoff_seconds: float = help_field(
        2.0, help="openai: first retry delay; it doubles on every retry. A Retry-After header (429, 503) wins.")


@dataclass
class EvalConfig:
    models: list[str] = help_field(
        factory=lambda: ["base", "sft", "dpo"],
        help="Models to compare: stage names of this run (base, sft, dpo), local paths or hub ids.",
    )
    question_file: str | None = help_field(
        None,
        help="Questions in MT-Bench's format (question_id, category, turns, optional reference): a local .jsonl "
        "(relative to the recipe file's folder), a URL of one (downloaded once) or a hub dataset id. Default: run_dir/data/questions.jsonl from "
        "the prep stage.",
    )
    question_split: str = help_field("train", help="Split to read when question_file is a hub dataset.")
    judge: JudgeConfig = help_field(factory=JudgeConfig, help="The judge.")
    max_new_tokens: int = help_field(64, help="Longest answer generated per turn.")
    batch_size: int = help_field(32, help="Questions answered together in one generate() call.")
    temperatures: dict[str, float] = help_field(
        factory=lambda: dict(MT_BENCH_TEMPERATURES),
        help="Sampling temperature per question category (MT-Bench's by default); 0 and unlisted categories are greedy.",
    )
