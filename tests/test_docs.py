"""The documentation: its stage and recipe-key tables are the ones the registry and the section dataclasses
generate, each in one page; every page of docs/ is in the site's navigation and linked from the README."""

import re
from pathlib import Path

import yaml

from finetune import docs
from finetune.registry import STAGES

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO / "docs").glob("*.md"))


def test_generated_tables_are_the_codes_and_each_is_in_one_page():
    holders = {name: [] for name in docs.TABLES}
    for page in [REPO / "README.md", *PAGES]:
        text = page.read_text()
        assert docs.with_tables(text) == text, \
            f"{page.name}'s tables are out of date: run `python -m finetune.docs --write docs/*.md`"
        for name in docs.tables_in(text):
            holders[name].append(page.name)
    assert holders == {"stages": ["stages.md"], "recipe keys": ["recipes.md"], "server classes": ["stages.md"]}


def test_tables_list_every_stage_and_recipe_key():
    stages, keys = docs.stage_table(), docs.recipe_key_table()
    assert all(f"`run_dir/{spec.folder}/`" in stages for spec in STAGES)
    assert "| `model.lora.r` | `16` |" in keys and "| `run_dir` | required |" in keys
    assert "| `sft` | `{}` | Any field of TRL's SFTConfig. |" in keys


def test_every_page_is_in_the_site_and_linked_from_the_readme_and_the_home_page():
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    in_nav = sorted(page for entry in nav for page in entry.values())
    assert in_nav == sorted(page.name for page in PAGES)
    readme_links = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", (REPO / "README.md").read_text()))
    home_links = set(re.findall(r"\]\(([\w-]+\.md)\)", (REPO / "docs" / "index.md").read_text()))
    assert readme_links == home_links == {page.name for page in PAGES} - {"index.md"}


def test_the_readme_stays_short():
    assert len((REPO / "README.md").read_text().splitlines()) < 250
