"""Look-alike checkpoints of the newest MoE families through the CLI, as a user runs them on a Hub model.

Each look-alike (tests/helpers/lookalike.py) is saved with save_pretrained: the family's own config class with its
default config's fields shrunk (3 layers, Nemotron-H 4: every layer kind its default has), a tokenizer with the
family's special tokens and its real chat template. The recipe names the folder as `model.name_or_path`; `moetune run`
(prep -> LoRA SFT -> LoRA DPO with the default roles -> eval) and `moetune merge` run through the CLI's entry point in
this process (a subprocess would add ~10 s of imports per command and family; the CLI in its own process is
tests/test_cli.py's and the other subprocess tests'). Each stage trains on one fixed batch (the whole data set), so its
logged loss must fall from the first step to the last.
"""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from finetune.config.parsing import load_recipe
from finetune.modeling import adapters
from finetune.modeling.loading import load_stage_model
from helpers.lookalike import NEWEST, build_lookalike
from helpers.recipes import logged, run_cli, write_lookalike_recipe

# Every step sees the same batch: 8 conversations and 4 preference pairs, each stage's batch the whole set.
ONE_BATCH = dict(
    data={"sources": [{"format": "synthetic", "options": {"sft": 8, "pairs": 4, "questions": 2}}]},
    sft={"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1.0e-2},
    dpo={"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1.0e-2},
)

pytestmark = pytest.mark.slow  # a whole pipeline per family: 50-60 s each on a 2-core machine at load 15


@pytest.mark.parametrize("family", list(NEWEST))
def test_lookalike_runs_prep_sft_dpo_eval_merge_through_name_or_path(family, tmp_path):
    folder = build_lookalike(family, tmp_path / "checkpoint")
    recipe = write_lookalike_recipe(tmp_path, folder, targets=None, **ONE_BATCH)  # targets=None: the default roles
    run, merged_folder = tmp_path / "run", tmp_path / "merged"
    run_cli(["run", str(recipe)])
    run_cli(["merge", str(run / "dpo"), "--out", str(merged_folder)])
    merged = AutoModelForCausalLM.from_pretrained(merged_folder).eval()  # the family's own class, no adapter left
    assert merged.config.model_type == NEWEST[family].model_type
    assert not any("lora_" in name for name, _ in merged.named_parameters())

    for stage in ("sft", "dpo"):
        outputs = json.loads((run / stage / "moetune_stage.json").read_text())["outputs"]
        assert outputs["kind"] == "adapter" and outputs["steps"] == 3
        losses = logged(run / stage)
        assert len(losses) == 3 and losses[-1] < losses[0], (stage, losses)
        adapter = load_file(run / stage / "adapter_model.safetensors")
        assert any(".experts." in name for name in adapter), stage  # the routed experts are adapted
        for role in (adapters.attention_linear_targets, adapters.shared_expert_targets):  # the other default roles
            modules = role(merged)
            assert not modules or any(f"{module}.lora_" in name for module in modules for name in adapter), role

    scores = json.loads((run / "eval" / "scores.json").read_text())["models"]["dpo"]
    assert scores["judged"] > 0 and scores["errors"] == 0 and isinstance(scores["overall"], (int, float))

    # The merged folder computes what the DPO adapter does on the model DPO trained (the SFT adapter merged in).
    source = load_recipe(recipe).model_source
    adapted = PeftModel.from_pretrained(load_stage_model(source, "sft"), str(run / "dpo")).eval()
    ids = torch.arange(3, 43).reshape(1, -1)
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        with adapted.disable_adapter():
            assert not torch.allclose(adapted(input_ids=ids).logits, expected, atol=1e-5)  # DPO moved the model
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
