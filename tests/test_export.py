"""`moetune export`: each format, reloaded by code that is not the export's, gives the trained model's logits.

- merged: AutoModelForCausalLM.from_pretrained on the exported folder;
- peft: PeftModel.from_pretrained on the base;
- vllm (per-expert families): a reference written here: each exported 2-D key's b @ a * alpha/r added to the base
  checkpoint's weight of the same name (the per-expert matrices as they lie in the base's safetensors), then
  from_pretrained on that checkpoint; 3-D families: PeftModel.from_pretrained (vLLM loads PEFT's layout there);
- sglang: a reference written here that reads the export as SGLang's loader reads it (sglang_reference: its key
  pattern, gate/up stacking, lora_alpha / r, the target check), its updates added to the base checkpoint.
Columns (h) and (i) of the conformance matrix.
"""

import json
import re
import shutil
import subprocess
import sys

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from finetune.core import families
from finetune.modeling import export_layouts as layouts
from finetune.modeling import server_classes
from finetune.stages import export
from helpers.nf4 import random_lora_on
from helpers.recipes import run_cli
from helpers.family_models import FAMILIES, ROLES, base_under_adapter, data, models, padded_batch, refused  # noqa: F401 (fixtures)



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


def per_expert_keys(base) -> bool:
    """Whether the base checkpoint stores a matrix per expert (`...experts.3.w1`), not one 3-D tensor per layer."""
    return any(re.search(r"\.experts\.\d+\.", key) for key in load_file(base / "model.safetensors"))


def linear_storage(model, adapter, base) -> set[str]:
    """How the base checkpoint stores the adapted Linears: "own" (a file tensor `<...>.weight` equal to its
    randomly initialised weight), "shared" (all its rows inside a bigger `.weight` tensor, with other Linears':
    Sarvam's query_key_value), "none" (no `.weight` tensor holds it: Inkling 2's `k_sconv.weight_proj`). Read by
    value, not name: checkpoints rename modules on disk (Nemotron-H's `backbone.`, Kimi-Linear's
    `self_attn.f_a_proj` for `forget_gate.f_a_proj`)."""
    on_disk = [tensor for key, tensor in load_file(base / "model.safetensors").items()
               if tensor.dim() == 2 and key.endswith(".weight")]  # a module's weight: a LoRA module name
    modules = {key.removeprefix("base_model.model.").split(".lora_A")[0]
               for key in load_file(adapter / "adapter_model.safetensors") if ".lora_A." in key}
    linears = [model.get_submodule(module).weight for module in modules if ".base_layer" not in module
               and isinstance(model.get_submodule(module), torch.nn.Linear)]
    found = set()
    for weight in linears:
        if any(tensor.shape == weight.shape and torch.equal(tensor, weight) for tensor in on_disk):
            found.add("own")
        elif any(tensor.shape[1] == weight.shape[1] and tensor.shape[0] > weight.shape[0]
                 and bool((tensor[:, None] == weight[None]).all(-1).any(0).all()) for tensor in on_disk):
            found.add("shared")
        else:
            found.add("none")
    return found


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
    loaded = peft.PeftModel.from_pretrained(base_under_adapter(base, tmp_path / "peft"), tmp_path / "peft")
    assert (logits_of(loaded, inputs) - expected).abs().max() <= 1e-4
    assert "## Serving" in (tmp_path / "merged" / "README.md").read_text()
    if flat_experts(models(family)):  # the export says that only moetune's loader applies it
        assert "moetune's loader only" in (tmp_path / "peft" / "README.md").read_text()


def vllm_mixed_reference(base, exported, family):
    """The base model plus the update vLLM's mixed-format loader builds from a PEFT 3-D file
    (LoRAModelManager._convert_3d_to_2d_moe_lora, vllm/lora/model_manager.py at 01533aa): per experts module M,
    `M.base_layer.lora_A` (r*E, in) -> (E, r, in), `lora_B` (out, r*E) -> (E, out, r), w1 = B's first half, w3 its
    second (interleaved only for GptOssForCausalLM), both on the shared A; `M.lora_*` likewise for w2; scaled by
    lora_alpha / r; other keys as LoRA Linears on the modules they name."""
    config = json.loads((exported / "adapter_config.json").read_text())
    scale, rank = config["lora_alpha"] / config["r"], config["r"]
    adapter = load_file(exported / "adapter_model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(base)
    pairs = {}
    for key, tensor in adapter.items():
        module, ab = key.removeprefix("base_model.model.").removesuffix(".weight").rsplit(".lora_", 1)
        pairs.setdefault(module, {})[ab] = tensor
    updates = {}
    for module in [m for m in pairs if m + ".base_layer" in pairs]:
        (gate_up_a, gate_up_b), (down_a, down_b) = [(pairs[m]["A"], pairs[m]["B"]) for m in (module + ".base_layer",
                                                                                             module)]
        count = gate_up_a.shape[0] // rank
        a = gate_up_a.reshape(count, rank, -1)
        b = gate_up_b.reshape(gate_up_b.shape[0], rank, count).permute(2, 0, 1)
        inter = b.shape[1] // 2
        down = down_b.reshape(down_b.shape[0], rank, count).permute(2, 0, 1) @ down_a.reshape(count, rank, -1)
        updates[module] = (b[:, :inter] @ a, b[:, inter:] @ a, down)
        del pairs[module], pairs[module + ".base_layer"]
    assert add_expert_updates(model, updates, scale, family)
    with torch.no_grad():
        for module, pair in pairs.items():
            model.get_submodule(module).weight += scale * pair["B"] @ pair["A"]
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_i_export_vllm_reloads_to_the_trained_logits(models, data, family, tmp_path):
    adapter, base, inputs, expected = trained_adapter(models, data, family, tmp_path)
    out = tmp_path / "vllm"
    three_d = families.text_model_type(family) in export.VLLM_3D
    fused = not three_d and not per_expert_keys(base)  # no per-expert names: vLLM's mixed-format 3-D loader
    if fused and not stacked_experts(models(family)):
        refused(lambda: export.export(adapter, "vllm", out), layouts.VLLM_FLAT if flat_experts(models(family))
                else layouts.VLLM_NO_STACKED)
    if not three_d and not fused and "none" in linear_storage(models(family), adapter, base):
        refused(lambda: export.export(adapter, "vllm", out), layouts.FUSED_LINEAR_ON_DISK)
    export.export(adapter, "vllm", out)
    assert not (tmp_path / "vllm.partial").exists()
    if three_d:
        reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    elif fused:
        assert "--enable-mixed-moe-lora-format" in (out / "README.md").read_text()
        reloaded = vllm_mixed_reference(base, out, family)
    else:
        keys = load_file(out / "adapter_model.safetensors")
        assert any(".experts.3." in key for key in keys)  # per expert
        reloaded = per_expert_reference(base, out, tmp_path / "reference")
    assert (logits_of(reloaded, inputs) - expected).abs().max() <= 1e-4
    assert "vllm serve" in (out / "README.md").read_text()


# What SGLang's loader reads (python/sglang/srt/lora at 00639c4d): per-expert 2-D keys `layers.{l}...experts.{e}.`
# (mem_pool.py: `re.search(r"experts\.(\d+)\.", name)`), each expert's gate_proj and up_proj stacked into
# gate_up_proj (lora.py normalize_gate_up_proj: A and B concatenated, gate first), B scaled by lora_alpha / r, and
# the experts module wrapped only when target_modules normalize to gate_up_proj and down_proj (lora_manager.py).
SGLANG_EXPERT_KEY = re.compile(r"layers\.\d+\..*\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.lora_([AB])\.weight$")
# The stacked 3-D keys (families whose checkpoint stores the experts fused): mem_pool.py's `elif "experts" in name
# and weights.dim() == 3` branch; lora.py normalize_gate_up_proj repeats a stacked gate_up_proj A twice along the
# rank; FusedMoEWithLoRA reads B's first half as gate rows, its second as up rows, and re-interleaves them for a base
# that interleaves (gpt-oss, whose checkpoint's gate_up_proj alternates gate and up rows).
SGLANG_STACKED_KEY = re.compile(r"layers\.\d+\.(.*\.)?experts\.(gate_up_proj|down_proj)\.lora_([AB])\.weight$")
INTERLEAVED_GATE_UP = {"gpt_oss"}
SGLANG_TARGETS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                  "up_proj": "gate_up_proj"}  # utils.get_normalized_target_modules, the names our adapters hold
CHECKPOINT_LEAVES = {"gate_proj": ("gate_proj", "w1"), "up_proj": ("up_proj", "w3"), "down_proj": ("down_proj", "w2")}


def lone_q_proj(adapter) -> bool:
    """Whether the trained adapter has a q_proj with no v_proj beside it (MLA, linear attention): SGLang's
    normalize_qkv_proj (lora.py, the version lora_manager.py at 300a92ca constructs with base_model=) reads
    `weights[v_name]` for every key holding `q_proj`, and a q projection that is its own module is never wrapped
    (q_proj normalizes to qkv_proj, utils.py at 300a92ca)."""
    keys = load_file(adapter / "adapter_model.safetensors")
    return any(".q_proj.lora_A." in key and key.replace(".q_proj.", ".v_proj.") not in keys for key in keys)


def stacked_experts(model) -> bool:
    """Whether the model's experts are modules holding gate_up_proj and down_proj (SGLang's stacked key names)."""
    return any(hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") for module in model.modules())


def flat_experts(model) -> bool:
    """Whether the model's experts are flat matrices moetune views as 3-D (DBRX)."""
    return bool(families.family_of(model).flat_experts)


def add_expert_updates(model, updates, scale, family):
    """Each expert's gate, up and down update ({experts module: (E, I, H), (E, I, H), (E, H, I)}) added to the fused
    experts module, in whichever orientation and gate/up order the family stores it; the shapes a server's buffers
    hold checked first (gate/up read the hidden size, down returns to it)."""
    hidden = model.config.get_text_config().hidden_size
    for owner, (gate, up, down) in updates.items():
        assert gate.shape[2] == hidden and down.shape[1] == hidden and down.shape[2] == gate.shape[1], owner
        gate_up = (torch.stack([gate, up], 2).flatten(1, 2) if family in INTERLEAVED_GATE_UP
                   else torch.cat([gate, up], 1))
        experts = model.get_submodule(owner)
        for name, delta in (("gate_up_proj", gate_up), ("down_proj", down)):
            weight = getattr(experts, name)
            assert weight.shape[1] != weight.shape[2], name  # the orientation is read off the shape
            with torch.no_grad():
                weight += scale * (delta if weight.shape[1:] == delta.shape[1:] else delta.transpose(1, 2))
    return bool(updates)


def sglang_stacked_updates(adapter):
    """SGLang's stacked experts keys read as its loader reads them (SGLANG_STACKED_KEY): per experts module, each
    expert's gate, up and down update."""
    stacked = {}
    for key, tensor in adapter.items():
        match = SGLANG_STACKED_KEY.search(key)
        if match is not None:
            assert tensor.dim() == 3, key
            owner = key.removeprefix("base_model.model.").split(f".{match[2]}.lora_")[0]
            stacked.setdefault(owner, {})[match[2], match[3]] = tensor
    updates = {}
    for owner, parts in stacked.items():
        rank = parts["gate_up_proj", "A"].shape[1]
        a = parts["gate_up_proj", "A"].repeat(1, 2, 1)  # normalize_gate_up_proj: [E, 2r, in]
        b = parts["gate_up_proj", "B"]
        inter = b.shape[1] // 2
        updates[owner] = (b[:, :inter] @ a[:, :rank], b[:, inter:] @ a[:, rank:],
                          parts["down_proj", "B"] @ parts["down_proj", "A"])
    return updates


def sglang_reference(base, exported, folder, family=None):
    """The base checkpoint plus the update SGLang's loader builds from the exported tensors: per expert, the stacked
    gate_up_proj A = [A_gate; A_up] (2r, in) and B = [B_gate; B_up] (2I, r), applied as B[:I] @ A[:r] to the gate
    rows and B[I:] @ A[r:] to the up rows (FusedMoEWithLoRA's [gate; up] order), added to the checkpoint's matrices
    of that expert (w1/w3/w2 or gate/up/down_proj), or for stacked 3-D keys to the fused experts
    (add_stacked_updates); other keys as ordinary LoRA Linears."""
    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and isinstance(config["target_modules"], list)  # what LoRAConfig accepts
    assert not config.get("rank_pattern") and not config.get("alpha_pattern") and not config["use_dora"]
    targets = {SGLANG_TARGETS.get(name, name) for name in config["target_modules"]}
    assert {"gate_up_proj", "down_proj"} <= targets  # else SGLang leaves the experts without LoRA
    scale = config["lora_alpha"] / config["r"]
    adapter = load_file(exported / "adapter_model.safetensors")
    weights = load_file(base / "model.safetensors")
    experts, updates = {}, {}
    for key, tensor in adapter.items():
        if SGLANG_STACKED_KEY.search(key) is not None:
            continue  # add_stacked_updates
        assert tensor.dim() == 2, key  # the per-expert branch: one matrix per expert
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        match = SGLANG_EXPERT_KEY.search(key)
        if match is not None:
            experts.setdefault(module.rsplit(".", 1)[0], {})[match[1], match[2]] = tensor
        elif ".lora_A." in key:
            if ".q_proj." in key:  # normalize_qkv_proj stacks q, k, v and reads v_proj beside q_proj (lone_q_proj)
                assert key.replace(".q_proj.", ".v_proj.") in adapter, key
            updates[f"{module}.weight"] = scale * adapter[key.replace(".lora_A.", ".lora_B.")] @ tensor
    for head, parts in experts.items():
        down = parts["down_proj", "B"] @ parts["down_proj", "A"]
        if ("up_proj", "A") not in parts:  # a non-gated expert: its gate_proj is w1, unstacked (c = 1)
            assert len(parts) == 4 and not any(f"{head}.{n}.weight" in weights for n in CHECKPOINT_LEAVES["gate_proj"])
            deltas = {"up_proj": parts["gate_proj", "B"] @ parts["gate_proj", "A"], "down_proj": down}
        else:
            assert len(parts) == 6, head  # gate, up and down, A and B, of every expert
            a = torch.cat([parts["gate_proj", "A"], parts["up_proj", "A"]])
            b = torch.cat([parts["gate_proj", "B"], parts["up_proj", "B"]])
            rank, inter = parts["gate_proj", "A"].shape[0], parts["gate_proj", "B"].shape[0]
            deltas = {"gate_proj": b[:inter] @ a[:rank], "up_proj": b[inter:] @ a[rank:], "down_proj": down}
        for leaf, delta in deltas.items():
            name = next(f"{head}.{n}.weight" for n in CHECKPOINT_LEAVES[leaf] if f"{head}.{n}.weight" in weights)
            updates[name] = scale * delta
    shutil.copytree(base, folder)
    for name, delta in updates.items():
        assert weights[name].shape == delta.shape, name
        weights[name] = weights[name] + delta
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert add_expert_updates(model, sglang_stacked_updates(adapter), scale, family) or experts
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_export_sglang_reloads_to_the_trained_logits(models, data, family, tmp_path):
    adapter, base, inputs, expected = trained_adapter(models, data, family, tmp_path)
    out = tmp_path / "sglang"
    model_type = families.text_model_type(family)
    if model_type in layouts.SGLANG_NO_MODEL_CLASS:  # no SGLang class to load on, whatever the adapter trains
        refused(lambda: export.export(adapter, "sglang", out), layouts.SGLANG_NO_MODEL_CLASS[model_type])
    if lone_q_proj(adapter):  # checked before the re-layout
        refused(lambda: export.export(adapter, "sglang", out), layouts.SGLANG_NO_QKV)
    per_expert = per_expert_keys(base)
    if not per_expert and not stacked_experts(models(family)):
        refused(lambda: export.export(adapter, "sglang", out), layouts.SGLANG_FLAT if flat_experts(models(family))
                else layouts.SGLANG_NO_STACKED)
    storage = linear_storage(models(family), adapter, base)
    if "none" in storage:
        refused(lambda: export.export(adapter, "sglang", out), layouts.FUSED_LINEAR_ON_DISK)
    if "shared" in storage:
        refused(lambda: export.export(adapter, "sglang", out), layouts.SGLANG_SHARED_LINEAR)
    export.export(adapter, "sglang", out)
    exported = load_file(out / "adapter_model.safetensors")
    assert any(SGLANG_STACKED_KEY.search(key) for key in exported) == (not per_expert)  # 3-D only where fused
    reloaded = sglang_reference(base, out, tmp_path / "reference", family)
    assert (logits_of(reloaded, inputs) - expected).abs().max() <= 1e-4
    readme = (out / "README.md").read_text()
    assert f"python -m sglang.launch_server --model-path {base} --enable-lora --lora-paths moetune={out}" in readme
    assert export.SGLANG_READ in readme and '"lora_path": "moetune"' in readme


def test_an_adapter_saved_by_peft_0_18_exports_as_its_own_update(models, data, tmp_path):
    """PEFT 0.18 read (E, out, in) expert parameters as (E, in, out): its lora_A spans `out`, lora_B `in`, and the
    update is einsum("o r e, e r i -> e i o", B, A) (peft 0.18's ParamWrapper.get_delta_weight). Exported, the
    adapter must give that update under today's PEFT, and the same vLLM tensors as its peft export re-exported."""
    adapter, base, inputs, _ = trained_adapter(models, data, "qwen3_moe", tmp_path, targets=["experts"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    rank, scale = config["r"], config["lora_alpha"] / config["r"]
    generator = torch.Generator().manual_seed(5)
    base_model = AutoModelForCausalLM.from_pretrained(base)
    expected = {}
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        owner, param = (module.removesuffix(".base_layer"), "gate_up_proj") if module.endswith(".base_layer") \
            else (module, "down_proj")
        weight = getattr(base_model.get_submodule(owner), param)
        experts, first, second = weight.shape
        old_a = torch.randn(experts * rank, first, generator=generator) * 0.1  # spans shape[1] (out)
        old_b = torch.randn(second, rank * experts, generator=generator) * 0.1  # spans shape[2] (in)
        tensors[key], tensors[key.replace("lora_A", "lora_B")] = old_a, old_b
        expected[f"{owner}.{param}"] = weight + scale * torch.einsum(
            "o r e, e r i -> e i o", old_b.reshape(second, rank, experts), old_a.reshape(experts, rank, first))
    old = tmp_path / "old"
    old.mkdir()
    save_file(tensors, old / "adapter_model.safetensors")
    (old / "adapter_config.json").write_text(json.dumps({**config, "peft_version": "0.18.0"}))
    export.export(old, "peft", tmp_path / "peft")
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "peft")
    merged = merged.merge_and_unload()
    for name, weight in expected.items():
        torch.testing.assert_close(merged.get_parameter(name), weight, rtol=0, atol=1e-5)
    export.export(old, "vllm", tmp_path / "vllm-old")
    export.export(tmp_path / "peft", "vllm", tmp_path / "vllm-new")
    old_keys = load_file(tmp_path / "vllm-old" / "adapter_model.safetensors")
    new_keys = load_file(tmp_path / "vllm-new" / "adapter_model.safetensors")
    assert old_keys.keys() == new_keys.keys()
    for key in old_keys:
        torch.testing.assert_close(old_keys[key], new_keys[key], rtol=0, atol=1e-6)


def cli(*args):
    """`moetune ...` through the CLI's entry point, in this process (a process of its own would start the libraries
    again, ~10 s a command); what it printed."""
    return run_cli(list(args))


def chain_batch(run_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "base")
    tokenizer.padding_side = "right"
    return tokenizer(["user: sort 3 1 2\nassistant: 1 2 3", "user: hi"], return_tensors="pt", padding=True)


@pytest.mark.slow
def test_lora_sft_then_lora_dpo_exported_through_the_cli_serves_the_trained_model(tmp_path):
    """prep -> LoRA SFT -> LoRA DPO, then `moetune export run/dpo --format vllm/sglang/merged`: the two adapters become
    one (ranks concatenated) on the base, and every export gives the logits of the model the run trained."""
    from finetune.modeling.loading import load_stage_model
    from finetune.config.parsing import load_recipe
    from tests.helpers.recipes import write_recipe

    recipe = str(write_recipe(tmp_path))
    cli("run", recipe, "--stages", "prep,sft,dpo", "model.lora.stages=[sft,dpo]")
    run = tmp_path / "run"
    cli("export", str(run / "dpo"), "--format", "vllm", "--out", str(tmp_path / "vllm"))
    cli("export", str(run / "dpo"), "--format", "merged", "--out", str(tmp_path / "merged"))
    cli("export", str(run / "dpo"), "--format", "sglang", "--out", str(tmp_path / "sglang"))
    inputs = chain_batch(run)
    trained = load_stage_model(load_recipe(recipe, ["model.lora.stages=[sft,dpo]"]), "dpo")
    expected = logits_of(trained, inputs)
    record = json.loads((tmp_path / "vllm" / "export.json").read_text())
    assert record["adapters"] == [str(run / "sft"), str(run / "dpo")]
    reference = per_expert_reference(run / "base", tmp_path / "vllm", tmp_path / "reference")
    assert (logits_of(reference, inputs) - expected).abs().max() <= 1e-4
    reference = sglang_reference(run / "base", tmp_path / "sglang", tmp_path / "sglang-reference")
    assert (logits_of(reference, inputs) - expected).abs().max() <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits_of(merged, inputs) - expected).abs().max() <= 1e-4
    serving = (tmp_path / "vllm" / "README.md").read_text()
    assert f"vllm serve {run / 'base'} --enable-lora --lora-modules moetune={tmp_path / 'vllm'}" in serving
    # push --format: the Hub gets the servable artifact, and its card says which and how to serve it
    cli("push", str(run / "dpo"), "--repo-id", "me/tiny-dpo", "--format", "merged", "--dry-run", str(tmp_path / "up"))
    card = (tmp_path / "up" / "README.md").read_text()
    assert "## Serving" in card and "vllm serve me/tiny-dpo" in card and "library_name: transformers" in card
    assert (tmp_path / "up" / "model.safetensors").is_file() and not (tmp_path / "up" / "adapter_config.json").exists()
    refused_push = subprocess.run([sys.executable, "-m", "finetune", "push", str(run / "dpo"), "--repo-id", "me/x",
                                   "--format", "vllm", "--dry-run", str(tmp_path / "up2")], capture_output=True,
                                  text=True, timeout=900)
    assert refused_push.returncode == 2 and "model.init" in refused_push.stderr  # its base is not on the Hub
    assert not (tmp_path / "up2").exists() and not (tmp_path / "up2.export").exists()


@pytest.mark.slow
def test_a_lora_run_of_a_family_with_experts_fused_on_disk_exports_for_sglang_and_vllm_through_the_cli(
        prepared_run, tmp_path):
    """granitemoe's checkpoint stores the experts fused: `moetune export --format sglang` writes SGLang's stacked 3-D
    keys and `--format vllm` PEFT's 3-D layout for vLLM's mixed-format loader, each giving the run's SFT logits."""
    recipe, run = prepared_run(tmp_path / "fused")
    overrides = ["model.init.architecture=granitemoe", "model.init.intermediate_size=64", "model.lora.stages=[sft]",
                 "sft.max_steps=2"]
    cli("run", recipe, "--stages", "sft", *overrides)
    cli("export", str(run / "sft"), "--format", "sglang", "--out", str(tmp_path / "sglang"))
    cli("export", str(run / "sft"), "--format", "vllm", "--out", str(tmp_path / "vllm"))
    inputs = chain_batch(run)
    trained = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), run / "sft")
    expected = logits_of(trained, inputs)
    assert any(SGLANG_STACKED_KEY.search(key) for key in load_file(tmp_path / "sglang" / "adapter_model.safetensors"))
    reference = sglang_reference(run / "base", tmp_path / "sglang", tmp_path / "sglang-reference", "granitemoe")
    assert (logits_of(reference, inputs) - expected).abs().max() <= 1e-4
    reference = vllm_mixed_reference(run / "base", tmp_path / "vllm", "granitemoe")
    assert (logits_of(reference, inputs) - expected).abs().max() <= 1e-4
    assert '"is_3d_lora_weight": true' in (tmp_path / "vllm" / "README.md").read_text()


@pytest.mark.slow
def test_an_adapter_trained_on_nf4_experts_merges_within_quantization_error_with_a_delta_report(tmp_path):
    """QLoRA SFT, exported merged: the experts are rounded through NF4 as training stored them, so the merged
    weights give the training model's logits (up to the NF4 kernels' float error), and delta_report.md measures each
    update against the NF4 step."""
    from finetune.modeling import expert_quant
    from finetune.modeling.loading import load_quantized
    from finetune.config.parsing import load_recipe
    from tests.helpers.recipes import write_recipe

    overrides = ["model.lora.stages=[sft]", "model.quantization.bits=4"]
    recipe = str(write_recipe(tmp_path))
    cli("run", recipe, "--stages", "prep,sft", *overrides)
    run = tmp_path / "run"
    cli("export", str(run / "sft"), "--format", "merged", "--out", str(tmp_path / "merged"))
    inputs = chain_batch(run)
    quantized = load_quantized(load_recipe(recipe, overrides), "base")
    trained = expert_quant.load_adapter(quantized, str(run / "sft"), trainable=False)
    expected = logits_of(trained, inputs)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits_of(merged, inputs) - expected).abs().max() <= 1e-3
    full = load_file(run / "base" / "model.safetensors")
    unrounded = AutoModelForCausalLM.from_pretrained(run / "base")  # the NF4 rounding is what the merge must keep
    assert full and (logits_of(unrounded, inputs) - expected).abs().max() > 1e-3
    report = json.loads((tmp_path / "merged" / "delta_report.json").read_text())
    assert {row["matrix"].rsplit(".", 1)[-1] for row in report} == {"gate_up_proj", "down_proj"}
    assert all(row["nf4_step"] > 0 and 0 <= row["delta_rms"] for row in report)
    assert "| matrix | update RMS | NF4 step |" in (tmp_path / "merged" / "delta_report.md").read_text()


def test_a_router_adapter_is_refused_for_vllm_with_the_reason_and_nothing_written(models, data, tmp_path, capsys):
    from finetune.cli import main

    adapter, _, _, _ = trained_adapter(models, data, "qwen3_moe", tmp_path, targets=["experts", "router"])
    out = tmp_path / "vllm"
    assert main(["export", str(adapter), "--format", "vllm", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "trains the router" in error and "--format merged" in error and "Traceback" not in error
    assert not out.exists() and not (tmp_path / "vllm.partial").exists()
    assert main(["export", str(adapter), "--format", "merged", "--out", str(out)]) == 0  # the fix it names works
    assert main(["export", str(adapter), "--format", "merged", "--out", str(out)]) == 2  # never overwrites
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "base"), "--format", "vllm", "--out", str(tmp_path / "x")]) == 2
    assert "holds no adapter" in capsys.readouterr().err


def test_an_export_for_a_server_without_the_familys_class_warns_in_its_output_and_readme(models, data, tmp_path,
                                                                                            capsys):
    """Inkling 2 has no vLLM or SGLang class (server_classes): an experts-only adapter is written for both, each
    export printing one warning line and saying it in its README and export.json; an adapter on Inkling 2's own
    Linears is refused for SGLang (no class sizes them), nothing written."""
    from finetune.cli import main

    adapter, _, _, _ = trained_adapter(models, data, "inkling2_text", tmp_path, targets=["experts"])
    for fmt, server in (("sglang", "SGLang"), ("vllm", "vLLM")):
        out = tmp_path / fmt
        assert main(["export", str(adapter), "--format", fmt, "--out", str(out)]) == 0
        said = f"{server} ({server_classes.READ_AT[fmt]}) registers no class for Inkling2ForCausalLM"
        printed = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
        assert len(printed) == 1 and printed[0].startswith(f"[export] warning: {said}")
        assert "--format merged" in printed[0]
        assert f"**Warning:** {said}" in (out / "README.md").read_text()
        record = json.loads((out / "export.json").read_text())
        assert record["server_class"] is None and said in record["server_warning"]
    attention, _, _, _ = trained_adapter(models, data, "inkling2_text", tmp_path / "attention", targets=["attention"])
    out = tmp_path / "sglang-attention"
    assert main(["export", str(attention), "--format", "sglang", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert layouts.SGLANG_NO_INKLING2 in error and "Traceback" not in error
    assert not out.exists() and not (tmp_path / "sglang-attention.partial").exists()


def test_an_export_for_a_server_with_the_familys_class_gives_no_warning(models, data, tmp_path, capsys):
    from finetune.cli import main

    adapter, _, _, _ = trained_adapter(models, data, "qwen3_moe", tmp_path, targets=["experts"])
    assert main(["export", str(adapter), "--format", "vllm", "--out", str(tmp_path / "vllm")]) == 0
    assert "warning" not in capsys.readouterr().out
    assert "Warning" not in (tmp_path / "vllm" / "README.md").read_text()
    record = json.loads((tmp_path / "vllm" / "export.json").read_text())
    assert record["server_class"]["class"] == "Qwen3MoeForCausalLM" and record["server_class"]["lora"] is True
    assert record["server_warning"] is None


def test_a_server_class_without_lora_and_a_checkpoints_own_architecture_name():
    """vLLM's Cohere2MoeForCausalLM has no SupportsLoRA (cohere2_moe.py at 055e47c2): a warning; Sarvam's released
    checkpoints say SarvamMoEForCausalLM where transformers builds Glm4MoeForCausalLM, and SGLang registers the
    former only: no warning."""
    assert "without LoRA support" in server_classes.warning("vllm", ("Cohere2MoeForCausalLM",))
    names = server_classes.architectures(type("Config", (), {"architectures": ["Glm4MoeForCausalLM"]}), "sarvam_moe")
    assert names == ("Glm4MoeForCausalLM", "SarvamMoEForCausalLM")
    assert server_classes.warning("sglang", names) is None


def test_a_dora_adapter_is_refused_for_vllm(models, data, tmp_path):
    adapter, _, _, _ = trained_adapter(models, data, "mixtral", tmp_path, targets=["attention"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        export.export(adapter, "vllm", tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()
