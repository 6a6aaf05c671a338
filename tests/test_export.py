"""`moetune export`: each format, reloaded by code that is not the export's, gives the trained model's logits.

- merged: AutoModelForCausalLM.from_pretrained on the exported folder;
- peft: PeftModel.from_pretrained on the base;
- vllm (per-expert families): a reference written here: each exported 2-D key's b @ a * alpha/r added to the base
  checkpoint's weight of the same name (the per-expert matrices as they lie in the base's safetensors), then
  from_pretrained on that checkpoint; 3-D families: PeftModel.from_pretrained (vLLM loads PEFT's layout there).
Columns (h) and (i) of the conformance matrix.
"""

import json
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from finetune import families
from finetune.cli import main
from finetune.modeling import export_layouts as layouts
from finetune.stages import export
from tests.test_expert_quant import random_lora_on
from tests.test_families import ROLES, data, models, padded_batch, refused  # noqa: F401 (fixtures)

FAMILIES = list(families.FAMILIES)


def trained_adapter(models, data, family, tmp_path, targets=ROLES):
    """(adapter folder, base folder, batch, the trained model's logits)."""
    model = models(family)
    base = tmp_path / "base"
    model.save_pretrained(base)
    data[0].save_pretrained(base)
    trained = random_lora_on(model, targets=targets)
    adapter = tmp_path / "adapter"
    trained.save_pretrained(adapter)
    point_at(adapter, base)
    inputs = padded_batch(data[0])
    with torch.no_grad():
        return adapter, base, inputs, trained(**inputs).logits


def point_at(adapter, base):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def logits_of(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


def per_expert_reference(base, exported, folder):
    """The base checkpoint with every exported 2-D LoRA key's update added to the file weight of the same name."""
    config = json.loads((exported / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    adapter = load_file(exported / "adapter_model.safetensors")
    shutil.copytree(base, folder)
    weights = load_file(base / "model.safetensors")
    touched = 0
    for key, lora_a in adapter.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        lora_b = adapter[key.replace(".lora_A.", ".lora_B.")]
        assert weights[name].shape == (lora_b.shape[0], lora_a.shape[1]), name  # a 2-D matrix of the checkpoint
        weights[name] = weights[name] + scale * lora_b @ lora_a
        touched += 1
    assert touched
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_h_export_merged_and_peft_reload_to_the_trained_logits(models, data, family, tmp_path):
    adapter, base, inputs, expected = trained_adapter(models, data, family, tmp_path)
    export.export(adapter, "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits_of(merged, inputs) - expected).abs().max() <= 1e-4
    export.export(adapter, "peft", tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "peft")
    assert (logits_of(loaded, inputs) - expected).abs().max() <= 1e-4
    assert "## Serving" in (tmp_path / "merged" / "README.md").read_text()


@pytest.mark.parametrize("family", FAMILIES)
def test_i_export_vllm_reloads_to_the_trained_logits(models, data, family, tmp_path):
    adapter, base, inputs, expected = trained_adapter(models, data, family, tmp_path)
    out = tmp_path / "vllm"
    if family not in export.VLLM_3D and families.FAMILIES[family].model_type in ("llama4_text", "granitemoe",
                                                                                "granitemoeshared", "granitemoehybrid"):
        refused(lambda: export.export(adapter, "vllm", out), "stores")
    export.export(adapter, "vllm", out)
    assert not (tmp_path / "vllm.partial").exists()
    if family in export.VLLM_3D:
        reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    else:
        keys = load_file(out / "adapter_model.safetensors")
        assert any(".experts.3." in key for key in keys)  # per expert
        reloaded = per_expert_reference(base, out, tmp_path / "reference")
        export.export(adapter, "sglang", tmp_path / "sglang")
        assert load_file(tmp_path / "sglang" / "adapter_model.safetensors").keys() == keys.keys()
    assert (logits_of(reloaded, inputs) - expected).abs().max() <= 1e-4
    assert "vllm serve" in (out / "README.md").read_text()
