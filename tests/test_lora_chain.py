"""LoRA SFT -> LoRA DPO with the default roles, through the CLI, for every family of the registry.

The way most people tune these models: an adapter in SFT, merged into the base when DPO starts, and a new adapter
in DPO. Four layers, so the families with dense layers before the MoE ones and shared experts have more than 20
adapted Linears: peft then saves the targets as shortened suffixes (`shared_experts.up_proj`), which moetune's
guard against peft's v4 -> v5 target conversion used to convert into the routed experts a second time, at double
rank, so DPO could not load the SFT adapter (issue #24).
"""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from finetune.core import families
from finetune.modeling.loading import load_stage_model
from finetune.config.parsing import load_recipe
from finetune.core.rundir import read_manifest
from helpers.recipes import run_cli, write_lora_chain_recipe
from helpers.family_models import FAMILIES

pytestmark = pytest.mark.slow  # prep, SFT and DPO per family: ~20-25 s each on a shared 2-core machine


@pytest.mark.parametrize("architecture", FAMILIES)
def test_lora_sft_then_lora_dpo_with_default_roles(architecture, tmp_path):
    recipe_path = write_lora_chain_recipe(tmp_path, architecture)
    run_cli(["run", str(recipe_path), "--stages", "prep,sft,dpo"])
    run = tmp_path / "run"
    outputs = read_manifest(run / "dpo")["outputs"]
    assert (outputs["kind"], outputs["parent"]) == ("adapter", "sft")

    # What DPO started from: the SFT adapter rebuilt on the base holds exactly the saved weights, every one of them.
    recipe = load_recipe(recipe_path)
    saved = load_file(run / "sft" / "adapter_model.safetensors")
    rebuilt = PeftModel.from_pretrained(load_stage_model(recipe.model_source, "base"), str(run / "sft"))
    loaded = get_peft_model_state_dict(rebuilt)
    assert set(loaded) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    # The default roles adapted the routed experts and, where the family has them, the shared experts.
    assert any(".experts." in name for name in saved)
    if families.FAMILIES[architecture].shared_experts:
        assert any(shared in name for name in saved for shared in families.FAMILIES[architecture].shared_experts)

    # The merged model DPO trained on (the SFT stage's model) computes what the adapter computes, and differs from
    # the base: the SFT adapter is in it, not a fresh or a lost one.
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        adapted = rebuilt.eval()(input_ids=ids).logits
        with rebuilt.disable_adapter():
            plain = rebuilt(input_ids=ids).logits
        merged = load_stage_model(recipe.model_source, "sft").eval()(input_ids=ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-5)
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


def run_chain(tmp_path, architecture, lora_stages):
    """(recipe path, run dir) of the LoRA chain recipe with these LoRA stages, after `moetune run --stages
    prep,sft,dpo`."""
    recipe_path = write_lora_chain_recipe(tmp_path, architecture, model={"lora": {"stages": lora_stages}})
    run_cli(["run", str(recipe_path), "--stages", "prep,sft,dpo"])
    return recipe_path, tmp_path / "run"


def test_llama4_text_full_sft_then_lora_dpo(tmp_path):
    """Llama 4's experts run their own forward and take no kernel choice: loading with one stopped SFT (#24)."""
    recipe_path, run = run_chain(tmp_path, "llama4_text", lora_stages=["dpo"])
    assert read_manifest(run / "sft")["outputs"]["kind"] == "full"
    outputs = read_manifest(run / "dpo")["outputs"]
    assert (outputs["kind"], outputs["parent"]) == ("adapter", "sft")
    recipe = load_recipe(recipe_path)
    base, tuned = load_stage_model(recipe.model_source, "base"), load_stage_model(recipe.model_source, "sft")
    assert type(tuned).__name__ == "Llama4ForCausalLM"
    changed = [name for name, param in tuned.named_parameters()
               if not torch.equal(param, base.get_parameter(name))]
    assert any(".experts." in name for name in changed)  # full fine-tuning trained the experts too


def test_full_dpo_trains_on_a_merged_lora_sft(tmp_path):
    """LoRA SFT, then full-fine-tuning DPO on the SFT adapter merged into the base: the merged weights train (PEFT
    leaves a merged base frozen, and DPO stopped at its first backward)."""
    recipe_path, run = run_chain(tmp_path, "mixtral", lora_stages=["sft"])
    assert read_manifest(run / "dpo")["outputs"]["kind"] == "full"
    recipe = load_recipe(recipe_path)
    start, tuned = load_stage_model(recipe.model_source, "sft"), load_stage_model(recipe.model_source, "dpo")
    changed = [name for name, param in tuned.named_parameters()
               if not torch.equal(param, start.get_parameter(name))]
    assert any(".experts." in name for name in changed) and any("self_attn" in name for name in changed)


@pytest.mark.parametrize("padding_free", [False, True])
def test_router_role_trains_in_sft_and_dpo_and_merges(tmp_path, padding_free):
    """The documented `router` role: PEFT wraps the router, and the expert-load tracking read `top_k` from the
    wrapper, so the first step crashed (#27). Padded and padding-free (packed rows: their own router hook path)."""
    recipe_path = write_lora_chain_recipe(tmp_path, "mixtral",
                                          model={"lora": {"targets": ["attention", "experts", "router"]}})
    run_cli(["run", str(recipe_path), "--stages", "prep,sft,dpo", f"speed.padding_free={str(padding_free).lower()}"])
    run = tmp_path / "run"
    for stage in ("sft", "dpo"):
        saved = load_file(run / stage / "adapter_model.safetensors")
        assert any(".mlp.gate.lora_" in name for name in saved), stage  # the router's adapter is saved
        load = json.loads((run / stage / "expert_load.json").read_text())
        assert load["history"] and all(sum(share) > 0.99 for share in load["history"][-1]["share"].values())
    run_cli(["merge", str(run / "dpo"), "--out", str(tmp_path / "merged")])
    recipe = load_recipe(recipe_path)
    base = load_stage_model(recipe.model_source, "base")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    router = "model.layers.0.mlp.gate.weight"
    assert not torch.equal(merged.get_parameter(router), base.get_parameter(router))  # both adapters merged in
