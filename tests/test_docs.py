"""The README's stage and recipe-key tables are the ones the registry and the section dataclasses generate."""

from pathlib import Path

from finetune import docs
from finetune.registry import STAGES

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tables_are_generated_from_the_code():
    text = README.read_text()
    assert docs.with_tables(text) == text, \
        "the README's tables are out of date: run `python -m finetune.docs --write README.md`"


def test_tables_list_every_stage_and_recipe_key():
    stages, keys = docs.stage_table(), docs.recipe_key_table()
    assert all(f"`run_dir/{spec.folder}/`" in stages for spec in STAGES)
    assert "| `model.lora.r` | `16` |" in keys and "| `run_dir` | required |" in keys
    assert "| `sft` | `{}` | Any field of TRL's SFTConfig. |" in keys
