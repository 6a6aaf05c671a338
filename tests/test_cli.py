"""The real CLI end to end on a tiny model: prep -> sft -> dpo -> eval, skips, refusals and --force."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from finetune.cli import main
from helpers.recipes import write_recipe


@pytest.mark.slow
def test_run_writes_every_stage(tiny_run):
    _, run = tiny_run
    for stage in ("data", "base", "sft", "dpo", "eval"):
        assert json.loads((run / stage / "moetune_stage.json").read_text())["stage"] == stage
    assert (run / "sft" / "model.safetensors").is_file()          # SFT trained all weights
    assert (run / "dpo" / "adapter_model.safetensors").is_file()  # DPO trained adapters
    assert (run / "sft" / "recipe.yaml").is_file() and (run / "eval" / "radar.png").is_file()
    scores = json.loads((run / "eval" / "scores.json").read_text())["models"]
    assert set(scores) == {"base", "sft", "dpo"}
    assert all(1 <= scores[m]["overall"] <= 10 for m in scores)


@pytest.mark.slow
def test_sft_loss_falls_and_aux_loss_and_expert_load_are_logged(tiny_run):
    _, run = tiny_run
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
def test_rerun_skips_changed_recipe_refuses_and_force_redoes(tiny_run_copy, capsys):
    recipe, run = tiny_run_copy
    assert main(["sft", str(recipe)]) == 0
    assert "skipping" in capsys.readouterr().out
    assert main(["sft", str(recipe), "sft.learning_rate=5e-4"]) == 2
    assert "changed: sft.learning_rate" in capsys.readouterr().err
    assert main(["sft", str(recipe), "model.lora.r=8"]) == 0  # DPO-only adapter settings do not touch SFT
    assert main(["dpo", str(recipe), "--force", "dpo.max_steps=2"]) == 0
    assert json.loads((run / "dpo" / "moetune_stage.json").read_text())["outputs"]["steps"] == 2


@pytest.mark.slow
def test_stages_write_a_run_report_with_plots_and_moetune_report_rebuilds_it(tiny_run_copy):
    import re

    from PIL import Image

    _, run = tiny_run_copy
    report = (run / "report.md").read_text()
    assert "## SFT" in report and "## DPO" in report and "## Evaluation" in report and "| overall |" in report
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert {"report/sft_curves.png", "report/dpo_curves.png", "report/sft_expert_load.png",
            "report/dpo_expert_load.png", "eval/radar.png"} <= set(images)
    for image in images:
        with Image.open(run / image) as png:
            assert png.format == "PNG" and png.width > 300
    (run / "report.md").unlink()
    shutil.rmtree(run / "report")
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == report and (run / "report" / "dpo_curves.png").is_file()


@pytest.mark.slow
def test_run_force_redoes_only_the_stale_stages_and_names_them(tiny_run_copy, capsys):
    recipe, run = tiny_run_copy
    kept = {name: (run / name / "moetune_stage.json").stat().st_mtime_ns for name in ("data", "base", "sft")}
    assert main(["run", str(recipe), "--force", "dpo.beta=0.3"]) == 0
    out = capsys.readouterr().out
    assert "--force: redoing dpo (changed: dpo.beta" in out and "eval (after dpo); keeping prep, sft" in out
    assert "Use --force" not in out
    assert {name: (run / name / "moetune_stage.json").stat().st_mtime_ns for name in kept} == kept
    assert json.loads((run / "dpo" / "moetune_stage.json").read_text())["inputs"]["dpo"]["beta"] == 0.3
    eval_inputs = json.loads((run / "eval" / "moetune_stage.json").read_text())["inputs"]
    assert eval_inputs["models"]["dpo"] == json.loads((run / "dpo" / "moetune_stage.json").read_text())["fingerprint"]


@pytest.mark.slow
def test_finished_eval_rerun_prints_its_scores_and_manifests_keep_integers(tiny_run, capsys):
    recipe, run = tiny_run
    assert main(["eval", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "skipping" in out and "| overall |" in out
    max_steps = json.loads((run / "sft" / "moetune_stage.json").read_text())["inputs"]["sft"]["max_steps"]
    assert max_steps == 6 and isinstance(max_steps, int)  # logging_steps is no input (it cannot change the result)
    assert "logging_steps: 2\n" in (run / "sft" / "recipe.yaml").read_text()


def test_losses_print_to_four_significant_figures():
    from finetune.training.saving import describe_loss

    assert describe_loss({"first_loss": 3.3868304443359376, "last_loss": 0.012345678}) == "loss 3.387 -> 0.01235"
    assert describe_loss({"first_loss": None, "last_loss": None, "mean_loss": 2.71828}) == \
        "mean loss 2.718 (no step logged: fewer steps than logging_steps)"


def test_a_stage_without_a_recipe_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sft"])
    assert exit_.value.code == 2 and "sft needs a recipe" in capsys.readouterr().err


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
    env = {**os.environ, "COLUMNS": "100"}
    out = subprocess.run([sys.executable, "-m", "finetune", "dpo", "--help"], capture_output=True, text=True, check=True,
                         env=env, timeout=300)
    assert "model.lora.targets" in out.stdout and "dpo.*" in out.stdout and "--force" in out.stdout
    assert max(len(line) for line in out.stdout.splitlines()) <= 100  # key help wrapped in its column
    assert out.stderr == ""  # no bitsandbytes kernel message or deprecation warning on a plain command
    fields = subprocess.run([sys.executable, "-m", "finetune", "dpo", "--trl-fields"], capture_output=True, text=True)
    assert "dpo.beta" in fields.stdout
