"""The command line answers before the training stack loads: `moetune --help`, a stage's --help and a recipe error
import none of torch, transformers, peft and trl (seconds of imports). How fast that is, is measured outside the
tests (`python -X importtime -m finetune --help`); these check what is imported, in a fresh interpreter each."""

import json
import os
import subprocess
import sys
from pathlib import Path

from finetune.config.trainer_fields import cache_file, read_fields, trainer_fields

REPO = Path(__file__).resolve().parents[1]
TRAINING_STACK = ("torch", "transformers", "peft", "trl")


def imported_after(code: str, cache: Path) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run `code` in a fresh interpreter; the training-stack modules it imported, and the process."""
    script = (code + "\nimport json, sys\n"
              f"print(json.dumps([name for name in {TRAINING_STACK!r} if name in sys.modules]))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MOETUNE_CACHE": str(cache)}
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                             cwd=REPO)
    assert process.returncode == 0, process.stderr[-2000:]
    return json.loads(process.stdout.strip().splitlines()[-1]), process


def test_help_imports_no_training_stack(tmp_path):
    code = ("from finetune.cli import main\n"
            "for argv in (['--help'], ['sft', '--help'], ['dpo', '--help'], ['run', '--help']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit as exit_:\n"
            "        assert exit_.code == 0\n")
    imported, process = imported_after(code, tmp_path)
    assert imported == []
    assert "fine-tunes with SFT then DPO" in process.stdout and "sft.* " in process.stdout  # it says what it does


def test_a_recipe_error_is_reported_before_the_training_stack_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("MOETUNE_CACHE", str(tmp_path / "cache"))
    trainer_fields("SFTConfig")  # an earlier command read TRL's fields once (this process has TRL already)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run_dir: run\nmodel: {init: {}}\nsft: {max_steps: 5, learnig_rate: 1.0e-4}\n")
    code = f"from finetune.cli import main\nassert main(['sft', {str(recipe)!r}]) == 2\n"
    imported, process = imported_after(code, tmp_path / "cache")
    assert imported == []
    assert "unknown key 'sft.learnig_rate'. Did you mean 'learning_rate'?" in process.stderr


def test_cached_trainer_fields_are_trls_and_a_damaged_cache_is_read_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MOETUNE_CACHE", str(tmp_path))
    live = read_fields("DPOConfig")
    assert trainer_fields("DPOConfig") == live and "beta" in live and live["learning_rate"] == "float"
    assert json.loads(cache_file("DPOConfig").read_text()) == live
    cache_file("DPOConfig").write_text('{"beta": "fl')  # torn by a crash
    assert trainer_fields("DPOConfig") == live
