"""`moetune plan` and the memory check before training: the plan of real models' configs, the refusal of a run that
does not fit (before any weight is read), and the estimator's arithmetic."""

from __future__ import annotations

import dataclasses
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
    JetMoE's one `weight` per expert module; DBRX's flat w1/v1/w2 as moetune views them (3-D). Doge's embedding rows
    are not counted."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.config.recipe import ModelInit
    from finetune.core import families
    from finetune.modeling import moe
    from finetune.modeling.loading import set_up_loaded
    from finetune.modeling.tiny import family_config

    counted = 0
    for model_type in families.moe_model_types():
        init = ModelInit(architecture=model_type, hidden_size=64, intermediate_size=64, num_layers=3, num_experts=4,
                         experts_per_token=2)
        with torch.device("meta"):
            model = set_up_loaded(AutoModelForCausalLM.from_config(
                family_config(init, 280, pad_token_id=None, eos_token_id=None)))
        census = memory_plan.census(model)
        if moe.experts_modules(model):  # all but Doge
            assert census.total["experts"] > 0 and census.expert_lora_elements > 0, model_type
            counted += 1
    assert counted >= 61


# Published sizes (model cards): total and activated parameters, and whether the card's activated count includes
# the input embeddings (DeepSeek's and OpenAI's do not).
PUBLISHED = {"mixtral-8x7b": (46.7e9, 12.9e9, True), "qwen3-30b-a3b": (30.5e9, 3.3e9, True),
             "gpt-oss-20b": (20.9e9, 3.6e9, False), "olmoe-1b-7b": (6.9e9, 1.3e9, True),
             "deepseek-v2-lite": (15.7e9, 2.4e9, False),
             # the size fields of DBRX's config (16 experts, top-4, 40 layers, d_model 6144, ffn 10752, 8 kv heads,
             # vocabulary 100,352): 132B total, 36B active on its card
             "dbrx-instruct": (132e9, 36e9, True)}


@pytest.mark.parametrize("config", sorted(PUBLISHED))
def test_parameters_of_real_configs_match_the_model_cards(config):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.modeling.loading import set_up_loaded

    with torch.device("meta"):  # as the plan builds it (training.stage_plan.model_census)
        model = set_up_loaded(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CONFIGS / config)))
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


def qwen3_census():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CONFIGS / "qwen3-30b-a3b"))
    return memory_plan.census(model)


def test_the_ep_layout_splits_what_transformers_splits():
    """model.expert_parallel N over n processes (DistributedConfig(fsdp_size=n, ep_size=N)): every weight 1/n at rest,
    a layer's dense part gathered twice (in use, prefetched) and its experts only within the process's group of N,
    the LM head kept whole through the backward; full fine-tuning's gradients and moments sharded, LoRA's whole but
    for the routed experts' factors."""
    census = qwen3_census()
    full = memory_plan.Setup(stage="sft", weight_bytes=2, lora_roles=None, batch=1, max_length=2048,
                             activation_checkpointing=True, layout="ep", processes=8, expert_parallel=8)
    rows = memory_plan.plan_stage(census, full).rows
    experts = census.total["experts"]
    dense_layer = max(w - e for w, e in zip(census.layer_weights, census.layer_expert_weights))
    expert_layer = max(census.layer_expert_weights)
    assert experts == sum(census.layer_expert_weights) and expert_layer == experts / 48  # 48 MoE layers
    # n = N: each process holds 1/8 of every layer's experts whole (nothing of them to gather) and 1/8 of the rest
    experts_per_process, rest_per_process = experts * 2 / 8, (census.parameters - experts) * 2 / 8
    head = census.head_frozen_elements * 2
    assert rows["weights"] == pytest.approx(experts_per_process + rest_per_process + 2 * dense_layer * 2 + head * 7 / 8)
    assert rows["gradients"] == pytest.approx(census.parameters * 2 / 8)
    assert rows["optimizer"] == pytest.approx(2 * census.parameters * 2 / 8)  # torch AdamW: bf16 moments, no master
    # 16 processes, experts in groups of 8: each expert FSDP-sharded over its 2 holders, gathered within its group
    wider = memory_plan.plan_stage(census, dataclasses.replace(full, processes=16)).rows
    assert wider["weights"] == pytest.approx(census.parameters * 2 / 16 + 2 * dense_layer * 2
                                             + 2 * expert_layer * 2 / 8 + head * 15 / 16)
    assert wider["optimizer"] == pytest.approx(rows["optimizer"] / 2)
    # fsdp2 gathers whole layers, experts included: EP's split is what spares it
    fsdp2 = memory_plan.plan_stage(census, dataclasses.replace(full, layout="fsdp2")).rows
    assert fsdp2["weights"] - rows["weights"] == pytest.approx(2 * expert_layer * 2 - head * 7 / 8)
    # LoRA on attention: PEFT adds the adapter after transformers sharded the model, so it is whole on each process
    lora = dataclasses.replace(full, lora_roles=frozenset({"attention"}), lora_r=8)
    lora_rows = memory_plan.plan_stage(census, lora).rows
    adapter = census.lora["attention"] * 8
    assert (lora_rows["adapter"], lora_rows["gradients"], lora_rows["optimizer"]) == (
        adapter * 4, adapter * 4, 2 * adapter * 4)
    # ... except the routed experts' factors, split with their experts: 1/8 of them per process, gradients and moments
    # alike (finetune/modeling/split_expert_lora.py)
    experts_too = memory_plan.plan_stage(census, dataclasses.replace(lora, lora_roles=frozenset({"attention",
                                                                                                 "experts"}))).rows
    held = adapter + census.lora["experts"] * 8 / 8
    assert (experts_too["adapter"], experts_too["gradients"], experts_too["optimizer"]) == pytest.approx(
        (held * 4, held * 4, 2 * held * 4))
    # on a CPU the process also keeps its share of the mapped checkpoint, and the main process gathers the whole
    # model to save a full fine-tune
    cpu = memory_plan.plan_stage(census, dataclasses.replace(full, device="cpu")).rows
    assert cpu["weights"] - rows["weights"] == pytest.approx(census.parameters * 2 / 8 + census.parameters * 2)
    # over the memory given, more GPUs keep the experts split: a multiple of model.expert_parallel
    tight = memory_plan.plan_stage(census, full, memory=24 * GiB)
    memory_plan.cheapest_change(census, tight)
    assert not tight.fits and tight.change == "16 GPUs under --accelerate ep" and tight.change_total <= 24 * GiB


def test_plan_of_an_expert_parallel_launch(capsys):
    """`moetune plan RECIPE --accelerate ep --gpus 8x... model.expert_parallel=8` plans the ep layout; an ep launch
    that splits nothing (expert_parallel 1) is planned as ddp and says so."""
    recipe = str(ROOT / "recipes" / "plans" / "olmoe-1b-7b-full.yaml")
    model = f"model.name_or_path={CONFIGS / 'olmoe-1b-7b'}"
    gpus = ["--gpus", "8xH100-80GB", "--json"]
    assert main(["plan", recipe, model, "--accelerate", "ep", "model.expert_parallel=8", *gpus]) == 0
    ep = json.loads(capsys.readouterr().out)["stages"][0]
    assert main(["plan", recipe, model, "--accelerate", "fsdp2", *gpus]) == 0
    fsdp2 = json.loads(capsys.readouterr().out)["stages"][0]
    assert (ep["setup"]["layout"], ep["setup"]["expert_parallel"], fsdp2["setup"]["layout"]) == ("ep", 8, "fsdp2")
    assert ep["memory_gib"]["optimizer"] == fsdp2["memory_gib"]["optimizer"]  # the same 1/8 of the moments
    assert ep["memory_gib"]["weights"] < fsdp2["memory_gib"]["weights"]  # no whole expert layer gathered
    assert main(["plan", recipe, model, "--accelerate", "ep", *gpus]) == 0
    unsplit = json.loads(capsys.readouterr().out)["stages"][0]
    assert unsplit["setup"]["layout"] == "ddp" and any("planned as ddp" in note for note in unsplit["notes"])


def test_a_model_that_cannot_checkpoint_activations_is_planned_and_trained_without_them(tmp_path, capsys):
    """moetune checkpoints activations by default on a GPU, and JetMoE refuses it (transformers): the plan counts
    its activations unchecked and never proposes checkpointing, the stage drops the default with a note, and a
    recipe asking for it stops naming its key (exit 2), before any step."""
    from types import SimpleNamespace

    from helpers.recipes import write_lora_chain_recipe

    from finetune.config.recipe import TrainerSettings
    from finetune.training.trainer_config import checkpointing_the_model_runs

    recipe = write_lora_chain_recipe(tmp_path, "jetmoe", num_layers=3)
    assert main(["plan", str(recipe), "--gpus", "1xH100-80GB", "--json"]) == 0
    jetmoe = json.loads(capsys.readouterr().out)["stages"][0]
    assert jetmoe["setup"]["activation_checkpointing"] is False
    (tmp_path / "mixtral").mkdir()
    mixtral = write_lora_chain_recipe(tmp_path / "mixtral", "mixtral", num_layers=3)
    assert main(["plan", str(mixtral), "--gpus", "1xH100-80GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][0]["setup"]["activation_checkpointing"] is True
    # over the memory that checkpointing alone fits in, the cheapest change is checkpointing only where it can run
    census = qwen3_census()
    setup = memory_plan.Setup(stage="sft", weight_bytes=2, lora_roles=frozenset({"attention"}), batch=1,
                              max_length=4096)
    checkpointed = memory_plan.plan_stage(census, dataclasses.replace(setup, activation_checkpointing=True))
    for model_census, change in ((census, "sft.activation_checkpointing=true"),
                                 (dataclasses.replace(census, checkpointing=False), "4 GPUs under --accelerate zero3")):
        plan = memory_plan.plan_stage(model_census, setup, memory=sum(checkpointed.rows.values()))
        memory_plan.cheapest_change(model_census, plan)
        assert not plan.fits and plan.change == change

    model = SimpleNamespace(supports_gradient_checkpointing=False)
    args = SimpleNamespace(activation_checkpointing=True)
    checkpointing_the_model_runs(args, model, TrainerSettings("sft", {}, 0, "auto", False))
    assert args.activation_checkpointing is False and "activation checkpointing off" in capsys.readouterr().out

    assert main(["run", str(recipe), "--stages", "prep,sft", "sft.activation_checkpointing=true"]) == 2
    error = capsys.readouterr().err
    assert "sft.activation_checkpointing: JetMoeForCausalLM does not support activation checkpointing" in error
    assert "Traceback" not in error
