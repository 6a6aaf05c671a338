"""`moetune plan` and the memory check before training: the plan of real models' configs, the refusal of a run that
does not fit (before any weight is read), and the estimator's arithmetic."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import launch
from finetune.training import stage_plan
from finetune.cli import main
from finetune.modeling import memory_plan
from finetune.modeling.memory_plan import GiB, ROWS
from finetune.config.parsing import load_recipe

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "model_configs"
# recipe in recipes/plans -> (its model's config under tests/model_configs, --gpus, --accelerate)
PLANNED_RECIPES = {
    "mixtral-8x7b-qlora": ("mixtral-8x7b", "1xH100-80GB", None),
    "mixtral-8x7b-qlora-8gpu": ("mixtral-8x7b", "8xH100-80GB", "ddp"),
    "qwen3-30b-a3b-lora": ("qwen3-30b-a3b", "1xH100-80GB", None),
    "qwen3-30b-a3b-qlora": ("qwen3-30b-a3b", "1xL40S", None),
    "gpt-oss-20b-lora": ("gpt-oss-20b", "1xH100-80GB", None),
    "olmoe-1b-7b-full": ("olmoe-1b-7b", "8xH100-80GB", "zero2"),
    "deepseek-v2-lite-lora": ("deepseek-v2-lite", "1xH100-80GB", None),
}
PLAN_LINE = re.compile(r"^#   (sft|dpo): (.*); total ([0-9.]+) of ([0-9.]+): (.*)$", re.M)


def plan_of(name: str):
    config, gpus, accelerate = PLANNED_RECIPES[name]
    recipe = load_recipe(str(ROOT / "recipes" / "plans" / f"{name}.yaml"),
                         [f"model.name_or_path={CONFIGS / config}"])
    target = stage_plan.make_target(recipe, gpus=gpus, layout=launch.layout_of(accelerate) if accelerate else None)
    return stage_plan.plan_recipe(recipe, target)


@pytest.mark.parametrize("name", sorted(PLANNED_RECIPES))
def test_real_recipe_plans_as_its_comment_says(name):
    """Each real recipe, planned on its model's published config.json, gives the figures its comment states."""
    text = (ROOT / "recipes" / "plans" / f"{name}.yaml").read_text()
    stated = {m[1]: m for m in PLAN_LINE.finditer(text)}
    plans = plan_of(name)
    assert sorted(stated) == sorted(plan.stage for plan in plans)
    for plan in plans:
        line = stated[plan.stage]
        rows = dict(part.rsplit(" ", 1) for part in line[2].split(", "))
        assert {row: float(value) for row, value in rows.items()} == pytest.approx(
            {row: round(plan.rows[row] / GiB, 1) for row in ROWS}, abs=0.051)
        assert float(line[3]) == pytest.approx(plan.total / GiB, abs=0.051)
        assert line[5].startswith("fits") == plan.fits


def test_census_of_every_moe_family_whatever_its_expert_layout():
    """Every `moetune run` plans its memory first (a census of the model on the meta device), so a family whose
    experts the census could not read stopped before any stage with a traceback: Nemotron-H's plain up_proj/down_proj,
    JetMoE's one `weight` per expert module. Families transformers cannot build at all (DBRX) are left out."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.config.recipe import ModelInit
    from finetune.core import families
    from finetune.modeling import moe
    from finetune.modeling.tiny import family_config

    counted = 0
    for model_type in families.moe_model_types():
        init = ModelInit(architecture=model_type, hidden_size=64, intermediate_size=64, num_layers=3, num_experts=4,
                         experts_per_token=2)
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(family_config(init, 280, pad_token_id=None, eos_token_id=None))
        except AttributeError:  # transformers' own config cannot build this family (DBRX)
            continue
        census = memory_plan.census(model)
        if moe.experts_modules(model):  # all but Doge, whose experts are embedding rows
            assert census.total["experts"] > 0 and census.expert_lora_elements > 0, model_type
            counted += 1
    assert counted >= 60


# Published sizes (model cards): total and activated parameters, and whether the card's activated count includes
# the input embeddings (DeepSeek's and OpenAI's do not).
PUBLISHED = {"mixtral-8x7b": (46.7e9, 12.9e9, True), "qwen3-30b-a3b": (30.5e9, 3.3e9, True),
             "gpt-oss-20b": (20.9e9, 3.6e9, False), "olmoe-1b-7b": (6.9e9, 1.3e9, True),
             "deepseek-v2-lite": (15.7e9, 2.4e9, False)}


@pytest.mark.parametrize("config", sorted(PUBLISHED))
def test_parameters_of_real_configs_match_the_model_cards(config):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CONFIGS / config))
    census = memory_plan.census(model)
    total, active, with_embeddings = PUBLISHED[config]
    assert census.parameters == pytest.approx(total, rel=0.01)
    # the plan's active count leaves out the embedding lookup (a lookup, no FLOPs)
    embeddings = census.total["embeddings"] if with_embeddings else 0
    assert sum(census.active.values()) + embeddings == pytest.approx(active, rel=0.06)


@pytest.mark.slow
def test_plan_command_prints_json_for_scripts():
    """`moetune plan RECIPE --gpus ... --json` as a user runs it: the model's config only, figures per stage."""
    recipe = ROOT / "recipes" / "plans" / "mixtral-8x7b-qlora.yaml"
    result = subprocess.run([sys.executable, "-m", "finetune", "plan", str(recipe), "--gpus", "1xH100-80GB",
                             f"model.name_or_path={CONFIGS / 'mixtral-8x7b'}", "--json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    sft = plan["stages"][0]
    assert [stage["stage"] for stage in plan["stages"]] == ["sft", "dpo"]
    assert set(sft["memory_gib"]) == set(ROWS) and sft["fits"] and sft["available_gib"] == pytest.approx(79.2)
    assert sum(sft["parameters"]["total"].values()) == pytest.approx(46.7e9, rel=0.01)
    assert set(sft["parameters"]["trainable"]) == {"attention", "experts"}
    # NF4 experts: 4.1 bits per expert weight (with double-quantized scales) instead of 16
    assert 21 < sft["memory_gib"]["weights"] < 24


def test_plan_on_this_cpu_and_the_cheapest_change(capsys):
    """Without --gpus it plans this machine's host memory; a bf16 LoRA of Qwen3-30B-A3B on one 48 GB GPU does not
    fit (61 GB of weights) and the plan names a change that does."""
    recipe = str(ROOT / "recipes" / "plans" / "qwen3-30b-a3b-lora.yaml")
    model = f"model.name_or_path={CONFIGS / 'qwen3-30b-a3b'}"
    assert main(["plan", recipe, model]) == 0
    assert "this CPU" in capsys.readouterr().out
    assert main(["plan", recipe, model, "--gpus", "1xL40S"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "cheapest change that fits: 2 GPUs under --accelerate zero3" in out


def test_layouts_split_what_they_shard():
    footprint = memory_plan.Footprint(frozen_weights=0, trained_weights=16 * GiB, adapter=0, gradients=16 * GiB,
                                      optimizer=32 * GiB, master_optimizer=96 * GiB, activations=GiB, lm_head=0,
                                      reference=16 * GiB, largest_layer=GiB, device="cpu")
    ddp, zero2, zero3, fsdp2 = (memory_plan.LAYOUTS[name](footprint, 8) for name in ("ddp", "zero2", "zero3", "fsdp2"))
    assert (ddp["weights"], ddp["optimizer"], ddp["reference"]) == (16 * GiB, 32 * GiB, 16 * GiB)
    assert (zero2["weights"], zero2["gradients"], zero2["optimizer"]) == (16 * GiB, 2 * GiB, 12 * GiB)
    assert (zero3["weights"], zero3["optimizer"], zero3["reference"]) == (4 * GiB, 12 * GiB, 2 * GiB)
    assert (fsdp2["weights"], fsdp2["optimizer"]) == (4 * GiB, 4 * GiB)


LOOKALIKE_RECIPE = """
run_dir: {run_dir}
model:
  name_or_path: {model}
  lora: {{targets: [attention, experts], r: 4, alpha: 8}}
data:
  sources: [{{format: synthetic, options: {{sft: 40, pairs: 20}}}}]
  dedup: exact
sft: {{max_steps: 1, per_device_train_batch_size: 64, max_length: 4096, logging_steps: 1}}
"""


def test_a_run_over_the_memory_given_refuses_before_loading_weights(tmp_path, capsys):
    """A look-alike recipe planned over --gpu-memory stops with exit 2, the numbers and the change, before any
    weight is read (here there are none to read) and before any stage runs; with the change it trains."""
    from helpers.lookalike import build_lookalike

    model = build_lookalike("qwen3_moe", tmp_path / "model")
    weights = model / "model.safetensors"
    weights.rename(tmp_path / "away.safetensors")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(LOOKALIKE_RECIPE.format(run_dir=tmp_path / "run", model=model))
    capsys.readouterr()
    assert main(["run", str(recipe), "--stages", "prep,sft", "--gpu-memory", "2GiB"]) == 2
    error = capsys.readouterr().err
    assert "the sft stage needs about" in error and "but 1 x GPU of 2GiB has 2.00 GiB" in error
    assert "cheapest change that fits: sft.per_device_train_batch_size=1" in error and "plan.refuse=false" in error
    assert not (tmp_path / "run").exists()
    (tmp_path / "away.safetensors").rename(weights)
    assert main(["run", str(recipe), "--stages", "prep,sft", "--gpu-memory", "2GiB",
                 "sft.per_device_train_batch_size=1"]) == 0
    assert (tmp_path / "run" / "sft" / "adapter_model.safetensors").is_file()
    # with the data prepared, the time per epoch comes from its real tokens at the stated MFU
    capsys.readouterr()
    assert main(["plan", str(recipe), "--gpus", "1xH100-80GB", "--json"]) == 0
    sft = json.loads(capsys.readouterr().out)["stages"][0]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in (tmp_path / "run" / "data" / "sft" / "train.jsonl").read_text().splitlines()]
    tokens = sum(min(4096, len(tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"]))
                 for row in rows)
    assert sft["epoch_tokens"] == tokens
    assert sft["epoch_seconds"] == pytest.approx(tokens * sft["flops_per_token"] / (989e12 * 0.25))
