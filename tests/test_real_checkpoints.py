"""The load path of real checkpoints, end to end: `model.name_or_path` pointing at a look-alike folder of a family
(its config class, special tokens, chat template or none, generation_config.json), then
prep -> sft -> dpo -> eval -> merge -> push --dry-run through the CLI, with LoRA on attention and experts.

Mixtral is the base-model case: its tokenizer has no chat template, so the run stops before SFT until the recipe
gives one (`model.chat_template`, the flagship recipe's Mistral template). Qwen3-MoE, gpt-oss and DeepSeek-V3 bring
their own templates, which have no `{% generation %}` markers: TRL swaps in its training copy for the loss mask.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.modeling.loading import load_stage_model
from finetune.config.parsing import load_recipe
from helpers.lookalike import FAMILIES, TRL_TEMPLATES, build_lookalike
from helpers.recipes import run_cli, write_lookalike_recipe

REPO = Path(__file__).resolve().parents[1]
MISTRAL_TEMPLATE = REPO / "recipes" / "chat_templates" / "mistral-instruct.jinja"

pytestmark = pytest.mark.slow  # a whole pipeline per family: ~45-60 s each on a shared 2-core machine


@pytest.fixture(scope="module", params=list(FAMILIES))
def finished(request, tmp_path_factory):
    """A whole run on a look-alike of one family: (family, recipe, run dir, upload folder, what the CLI printed)."""
    family, tmp_path = request.param, tmp_path_factory.mktemp(request.param)
    folder = build_lookalike(family, tmp_path / "checkpoint")
    recipe = write_lookalike_recipe(tmp_path, folder)
    printed = []
    if FAMILIES[family].template is None:  # a base model: refused until the recipe gives a template
        printed.append(run_cli(["run", str(recipe)], expect=2))
        recipe = write_lookalike_recipe(tmp_path, folder, template=MISTRAL_TEMPLATE)
    printed.append(run_cli(["run", str(recipe)]))
    run = tmp_path / "run"
    printed.append(run_cli(["merge", str(run / "dpo"), "--out", str(tmp_path / "merged")]))
    # The look-alike base is a local folder, so the sft adapter is named as pushed before (push refuses otherwise).
    printed.append(run_cli(["push", str(run / "dpo"), "--repo-id", "me/lookalike-dpo", "--parent-repo-id",
                            "me/lookalike-sft", "--dry-run", str(tmp_path / "upload")]))
    return family, recipe, run, tmp_path, "\n".join(printed)


def test_every_stage_completes_with_adapters_that_moved(finished):
    family, recipe, run, _, printed = finished
    for stage in ("data", "sft", "dpo", "eval"):
        assert json.loads((run / stage / "moetune_stage.json").read_text())["stage"] == stage
    for stage in ("sft", "dpo"):
        outputs = json.loads((run / stage / "moetune_stage.json").read_text())["outputs"]
        assert outputs["kind"] == "adapter" and outputs["steps"] == 2
        adapter = load_file(run / stage / "adapter_model.safetensors")
        assert any("experts" in name for name in adapter) and any("attn" in name for name in adapter)
        assert not any(".gate." in name or name.endswith("gate.weight") for name in adapter)  # router frozen
        assert max(t.abs().max().item() for name, t in adapter.items() if "lora_B" in name) > 0
    assert json.loads((run / "eval" / "moetune_stage.json").read_text())["outputs"]
    # Every family here runs padding-free, gpt-oss's eager attention with sinks and sliding windows included.
    assert "speed.padding_free is off" not in printed


def test_the_stage_tokenizer_keeps_the_family_tokens_and_template(finished):
    family, recipe, run, _, _ = finished
    spec = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(run / "dpo")
    assert tokenizer.eos_token == spec.eos
    expected = MISTRAL_TEMPLATE.read_text() if spec.template is None else (TRL_TEMPLATES / spec.template).read_text()
    assert tokenizer.chat_template == expected  # the family's own template, not TRL's training copy
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                         tokenize=False)
    assert text.rstrip().endswith(spec.eos if family != "qwen3_moe" else "<|im_end|>")


def test_merged_model_reproduces_the_dpo_chain(finished):
    family, recipe, run, tmp_path, _ = finished
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    chain = load_stage_model(load_recipe(recipe).model_source, "dpo").eval()
    ids = torch.tensor([[3, 17, 42, 99, 5, 61, 7, 200]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, chain(ids).logits, rtol=1e-4, atol=1e-4)
    generation = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == AutoTokenizer.from_pretrained(run / "dpo").eos_token_id


def test_dry_run_upload_holds_the_adapter_tokenizer_and_card(finished):
    family, recipe, run, tmp_path, _ = finished
    upload = tmp_path / "upload"
    names = {path.name for path in upload.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= names
    assert "base_model: me/lookalike-sft" in (upload / "README.md").read_text()
    assert json.loads((upload / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/lookalike-sft"


def test_a_base_model_without_template_is_refused_naming_the_recipe_key(finished):
    family, _, _, _, printed = finished
    refused = "has no chat template (a base model's tokenizer); set model.chat_template in the recipe" in printed
    assert refused == (FAMILIES[family].template is None)
