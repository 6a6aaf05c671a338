"""A chat template whose text before the first reply fills sft.max_length: prep warns, SFT stops with the reason.

gpt-oss's template renders a long system block before the first message; with `sft.max_length: 128` TRL dropped
every example as fully masked and torch stopped with "num_samples=0" (issue #24).
"""

import re

import pytest

from helpers.lookalike import build_lookalike
from helpers.recipes import run_cli, write_lookalike_recipe


@pytest.mark.slow  # a look-alike, prep, a refused SFT and a real one: ~25 s on a shared 2-core machine
def test_template_longer_than_max_length_is_named_with_the_length_it_needs(tmp_path):
    folder = build_lookalike("gpt_oss", tmp_path / "checkpoint")
    recipe = write_lookalike_recipe(tmp_path, folder)  # a LoRA run on the look-alike, its sft.max_length cut to 128 below
    cut = "sft.max_length=128"

    prepared = run_cli(["prep", str(recipe), cut])
    warnings = [line for line in prepared.splitlines() if "warning: sft.max_length=128" in line]
    assert len(warnings) == 1 and "would cut 100% of the SFT conversations" in warnings[0]

    refused = run_cli(["sft", str(recipe), cut], expect=2)
    assert "num_samples" not in refused and "Traceback" not in refused
    message = re.search(r"sft\.max_length=128 cuts every training conversation before its first assistant token.*"
                        r"Set sft\.max_length above (\d+)", refused)
    assert message, refused
    needed = int(message.group(1))
    assert 128 < needed < 320

    # The corrected run works without --force, at the length the message gave.
    run_cli(["sft", str(recipe), f"sft.max_length={needed + 32}"])
    assert (tmp_path / "run" / "sft" / "adapter_model.safetensors").is_file()
