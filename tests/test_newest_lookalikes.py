"""Look-alike checkpoints of the newest MoE families through the CLI, as a user runs them on a Hub model.

Each look-alike (tests/helpers/lookalike.py) is saved with save_pretrained: the family's own config class with its default
config's fields shrunk, a tokenizer with the family's special tokens and its real chat template. The recipe names
the folder as `model.name_or_path`; prep -> LoRA SFT -> LoRA DPO (default roles) -> eval -> merge run through
`moetune`. DeepSeek-V4 runs in the suite; all six with MOETUNE_ALL_FAMILIES=1 (one to three minutes each on a
shared 2-core machine).
"""

import json
import os

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers.lookalike import NEWEST, build_lookalike
from helpers.recipes import run_cli

IN_SUITE = ("deepseek_v4",)
RECIPE = """
run_dir: {run_dir}
seed: 7
model:
  name_or_path: {folder}
  lora: {{r: 4, alpha: 8}}
data:
  sources: [{{format: synthetic, options: {{sft: 24, pairs: 12, questions: 2}}}}]
  dedup: exact
  test_size: 0
sft: {{max_steps: 2, per_device_train_batch_size: 4, learning_rate: 1.0e-3, logging_steps: 1, max_length: 384}}
dpo: {{max_steps: 2, per_device_train_batch_size: 2, learning_rate: 1.0e-3, logging_steps: 1, max_length: 384}}
eval: {{models: [dpo], max_new_tokens: 4, batch_size: 2}}
"""

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", list(NEWEST) if os.environ.get("MOETUNE_ALL_FAMILIES") == "1" else IN_SUITE)
def test_lookalike_runs_prep_sft_dpo_eval_merge_through_name_or_path(family, tmp_path):
    folder = build_lookalike(family, tmp_path / "checkpoint")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(run_dir=tmp_path / "run", folder=folder))
    run_cli(["run", str(recipe)])
    run_cli(["merge", str(tmp_path / "run" / "dpo"), "--out", str(tmp_path / "merged")])
    for stage in ("sft", "dpo"):
        outputs = json.loads((tmp_path / "run" / stage / "moetune_stage.json").read_text())["outputs"]
        assert outputs["kind"] == "adapter" and outputs["steps"] == 2
        adapter = load_file(tmp_path / "run" / stage / "adapter_model.safetensors")
        assert any("experts" in name for name in adapter)  # the routed experts are adapted
        assert max(t.abs().max().item() for name, t in adapter.items() if "lora_B" in name) > 0
    assert json.loads((tmp_path / "run" / "eval" / "scores.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.model_type == NEWEST[family].model_type
