"""The real CLI end to end on a tiny model: prep -> sft -> dpo -> eval, skips, refusals and --force."""

import json
import subprocess
import sys

import pytest

from finetune.cli import main
from helpers.recipes import write_recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli")
    recipe = write_recipe(tmp_path)
    assert main(["run", str(recipe)]) == 0
    return recipe, tmp_path / "run"


@pytest.mark.slow
def test_run_writes_every_stage(finished_run):
    _, run = finished_run
    for stage in ("data", "base", "sft", "dpo", "eval"):
        assert json.loads((run / stage / "moetune_stage.json").read_text())["stage"] == stage
    assert (run / "sft" / "model.safetensors").is_file()          # SFT trained all weights
    assert (run / "dpo" / "adapter_model.safetensors").is_file()  # DPO trained adapters
    assert (run / "sft" / "recipe.yaml").is_file() and (run / "eval" / "radar.png").is_file()
    scores = json.loads((run / "eval" / "scores.json").read_text())["models"]
    assert set(scores) == {"base", "sft", "dpo"}
    assert all(1 <= scores[m]["overall"] <= 10 for m in scores)


@pytest.mark.slow
def test_sft_loss_falls_and_aux_loss_and_expert_load_are_logged(finished_run):
    _, run = finished_run
    history = json.loads((run / "sft" / "metrics.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[-1] < losses[0]
    assert all("aux_loss" in entry and "expert_load_cv_mean" in entry for entry in history if "loss" in entry)
    load = json.loads((run / "sft" / "expert_load.json").read_text())
    assert len(load["layers"]) == 1 and load["history"]
    shares = load["history"][-1]["share"][load["layers"][0]]
    assert len(shares) == 4 and sum(shares) == pytest.approx(1, abs=1e-4)
    dpo_history = json.loads((run / "dpo" / "metrics.json").read_text())
    assert any("aux_loss" in entry for entry in dpo_history)


@pytest.mark.slow
def test_rerun_skips_changed_recipe_refuses_and_force_redoes(finished_run, capsys):
    recipe, run = finished_run
    assert main(["sft", str(recipe)]) == 0
    assert "skipping" in capsys.readouterr().out
    assert main(["sft", str(recipe), "sft.learning_rate=5e-4"]) == 2
    assert "changed: sft.learning_rate" in capsys.readouterr().err
    assert main(["sft", str(recipe), "model.lora.r=8"]) == 0  # DPO-only adapter settings do not touch SFT
    assert main(["dpo", str(recipe), "--force", "dpo.max_steps=2"]) == 0
    assert json.loads((run / "dpo" / "moetune_stage.json").read_text())["outputs"]["steps"] == 2


@pytest.mark.slow
def test_aux_loss_off_when_coefficient_is_zero(tmp_path):
    recipe = write_recipe(tmp_path, architecture="qwen3_moe")
    assert main(["run", str(recipe), "--stages", "prep,sft", "sft.router_aux_loss_coef=0", "sft.max_steps=2"]) == 0
    history = json.loads((tmp_path / "run" / "sft" / "metrics.json").read_text())
    assert not any("aux_loss" in entry for entry in history)


def test_errors_are_reported_without_traceback(tiny_recipe, capsys):
    assert main(["sft", str(tiny_recipe)]) == 2
    assert "Run `moetune prep RECIPE` first" in capsys.readouterr().err
    assert main(["sft", str(tiny_recipe), "sft.max_stepz=3"]) == 2
    assert "Did you mean 'max_steps'" in capsys.readouterr().err


def test_console_script_help_explains_options():
    out = subprocess.run([sys.executable, "-m", "finetune", "dpo", "--help"], capture_output=True, text=True,
                         check=True, timeout=300)
    assert "model.lora.targets" in out.stdout and "dpo.*" in out.stdout and "--force" in out.stdout
    fields = subprocess.run([sys.executable, "-m", "finetune", "dpo", "--trl-fields"], capture_output=True, text=True,
                            timeout=300)
    assert "dpo.beta" in fields.stdout
