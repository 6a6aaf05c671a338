"""DBRX's flat expert matrices (finetune/modeling/flat_experts.py): trained as 3-D experts through moetune's loader,
written back as DBRX's own 2-D checkpoint tensors that the unpatched transformers class loads.

The conformance cells run DBRX through every check (tests/test_families.py, tests/test_export.py, and the CLI chain
in tests/test_every_family.py with MOETUNE_ALL_FAMILIES=1); here the round trip itself, in a few seconds, and with
MOETUNE_ALL_FAMILIES=1 the CLI chain's stage outputs looked into.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from finetune.cli import main
from finetune.config.recipe import LoraConfig, ModelInit
from finetune.core import synthetic_task as synthetic
from finetune.core.rundir import read_manifest
from finetune.modeling import adapters, moe
from finetune.modeling.flat_experts import flatten_state_dict
from finetune.modeling.loading import load_stage_model, set_up_loaded
from finetune.config.parsing import load_recipe
from finetune.modeling.tiny import init_config, train_tokenizer
from helpers.family_models import load_as_cli
from helpers.recipes import write_lora_chain_recipe

EXPERTS, HIDDEN, FFN = 4, 64, 128  # ffn != hidden: an orientation mixed up shows as a shape error
FLAT = ("w1", "v1", "w2")


def dbrx_init(layers: int = 2) -> ModelInit:
    return ModelInit(architecture="dbrx", hidden_size=HIDDEN, intermediate_size=FFN, num_layers=layers, num_heads=4,
                     num_kv_heads=2, num_experts=EXPERTS, experts_per_token=2, router_aux_loss_coef=0.01)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [m["content"] for row in synthetic.sft_conversations(20, 0) for m in row["messages"]]
    return train_tokenizer(texts, vocab_size=160)


def expert_weights(model, name: str) -> torch.Tensor:
    return model.get_submodule("transformer.blocks.1.ffn.experts.mlp").get_parameter(name)


def test_dbrx_experts_train_as_3d_and_save_as_the_checkpoint_names_them(tokenizer, tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(init_config(dbrx_init(), tokenizer)).save_pretrained(tmp_path / "base")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = load_as_cli(tmp_path / "base").eval()
    ids = torch.tensor([tokenizer("12 + 34 = 46")["input_ids"]])
    with torch.no_grad():
        base_logits = plain(ids).logits
        torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)  # DBRX's own forward, unchanged
    assert expert_weights(model, "w1").shape == (EXPERTS, FFN, HIDDEN)
    assert expert_weights(plain, "w1").shape == (EXPERTS * FFN, HIDDEN)

    config = adapters.peft_config(model, LoraConfig(r=4, alpha=8))  # the default roles
    assert sorted(config.target_parameters) == [f"experts.mlp.{name}" for name in sorted(FLAT)]
    assert {name.rsplit(".", 1)[-1] for name in config.target_modules} == {"Wqkv", "out_proj"}
    trained = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    for name, param in trained.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    trained.train()
    trained(input_ids=ids, labels=ids).loss.backward()
    expert_grads = [n for n, p in trained.named_parameters() if "experts.mlp" in n and p.grad is not None
                    and p.grad.abs().sum() > 0]
    assert len(expert_grads) == 2 * 3 * 2  # lora_A and lora_B of w1, v1, w2 in both layers: all get gradients
    assert not any(p.requires_grad for n, p in trained.named_parameters() if ".router." in n)
    trained.eval()
    with torch.no_grad():
        expected = trained(ids).logits
        with trained.disable_adapter():  # DPO's reference policy: the base exactly
            torch.testing.assert_close(trained(ids).logits, base_logits, rtol=0, atol=0)
    assert (expected - base_logits).abs().max() > 1e-3  # the experts' adapter changes the model

    trained.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(load_as_cli(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)

    trained.merge_and_unload().save_pretrained(tmp_path / "merged")
    on_disk = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(on_disk[f"transformer.blocks.1.ffn.experts.mlp.{name}"].shape == (EXPERTS * FFN, HIDDEN) for name in FLAT)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # transformers' own class, unpatched
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
    stacked = load_as_cli(tmp_path / "base")
    stacked.load_state_dict(merged.state_dict())  # a checkpoint's 2-D tensors into the 3-D view (Trainer's resume)
    assert torch.equal(expert_weights(stacked, "w2").reshape(-1, HIDDEN), expert_weights(merged, "w2"))
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(stacked.eval().generate(ids, **greedy), merged.generate(ids, **greedy))  # eval's generate


@pytest.mark.skipif(os.environ.get("MOETUNE_ALL_FAMILIES") != "1", reason="the CLI chain runs with the conformance "
                    "matrix (MOETUNE_ALL_FAMILIES=1); the default suite runs the round trip above")
def test_dbrx_cli_chain_adapts_its_experts_and_merges_to_a_dbrx_checkpoint(tmp_path):
    """`moetune run` (prep -> LoRA SFT -> LoRA DPO, default roles -> eval) and `moetune merge` on a model.init DBRX:
    both adapters hold LoRA on the experts' w1/v1/w2, the merged folder is DBRX's own layout, and transformers'
    class loads it to the logits of the DPO stage as moetune loads it (base -> sft -> dpo merged on the way)."""
    recipe = write_lora_chain_recipe(tmp_path, "dbrx", num_layers=3, model={"init": {"intermediate_size": FFN}},
                                     eval={"models": ["dpo"], "max_new_tokens": 4, "batch_size": 4})
    assert main(["run", str(recipe)]) == 0
    assert main(["merge", str(tmp_path / "run" / "dpo"), "--out", str(tmp_path / "merged")]) == 0
    # the chain as one PEFT adapter (ranks concatenated), merged back through moetune's loader as its README says
    assert main(["export", str(tmp_path / "run" / "dpo"), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert f"moetune merge {tmp_path / 'peft'}" in (tmp_path / "peft" / "README.md").read_text()
    assert main(["merge", str(tmp_path / "peft"), "--out", str(tmp_path / "peft-merged")]) == 0
    for stage in ("sft", "dpo"):
        keys = load_file(tmp_path / "run" / stage / "adapter_model.safetensors")
        assert sum(".ffn.experts.mlp." in key and "lora_A" in key for key in keys) == 3 * 3  # w1, v1, w2 x 3 layers
        assert read_manifest(tmp_path / "run" / stage)["outputs"]["kind"] == "adapter"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert expert_weights(merged, "w1").shape == (EXPERTS * FFN, HIDDEN)
    source = load_recipe(recipe).model_source
    dpo, base = load_stage_model(source, "dpo").eval(), load_stage_model(source, "base")
    assert not torch.equal(expert_weights(dpo, "v1").reshape(-1, HIDDEN), expert_weights(base, "v1").reshape(-1, HIDDEN))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    from_export = AutoModelForCausalLM.from_pretrained(tmp_path / "peft-merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, dpo(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_export(ids).logits, dpo(ids).logits, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "run" / "eval" / "scores.json").is_file()
    assert moe.experts_modules(dpo)


def test_dbrx_experts_partitioned_by_zero3_are_viewed_3d_by_their_logical_shape(tokenizer):
    """Under DeepSpeed ZeRO-3 every parameter is a flat shard when the model is built: `.data` an empty placeholder,
    the logical shape in `ds_shape`, which every gather views the shards as. Stacking keeps each Parameter (DeepSpeed
    knows it by identity) and makes its `ds_shape` 3-D; PEFT sizes the experts' LoRA from it. The real run:
    tests/test_distributed.py::test_zero3_trains_dbrx_flat_experts_like_one_process_and_saves_dbrx_checkpoints."""
    model = AutoModelForCausalLM.from_config(init_config(dbrx_init(), tokenizer))
    partitioned, gathered = {}, expert_weights(model, "w2").detach().clone()
    for name in FLAT:
        param = expert_weights(model, name)
        param.ds_shape, param.ds_numel = param.shape, param.numel()
        if name != "w2":  # w2 as if gathered at this moment: its data whole
            param.data = torch.empty(0)
        partitioned[name] = param
    set_up_loaded(model)
    for name in FLAT:
        assert expert_weights(model, name) is partitioned[name]
        assert partitioned[name].ds_shape == (EXPERTS, FFN, HIDDEN)
    assert partitioned["w1"].numel() == 0 and moe.shape_of(partitioned["w1"]) == (EXPERTS, FFN, HIDDEN)
    assert torch.equal(partitioned["w2"].data, gathered.view(EXPERTS, FFN, HIDDEN))


def test_a_state_dict_gathered_past_the_hooks_is_written_2d(tokenizer):
    """DeepSpeed ZeRO-3's 16-bit save gathers each parameter in its (3-D) `ds_shape` without `state_dict()` and
    its hooks; what Trainer then saves is flattened to the checkpoint's tensors, which the unpatched class loads."""
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(init_config(dbrx_init(), tokenizer))
    checkpoint = {key: tensor.clone() for key, tensor in plain.state_dict().items()}
    stacked = set_up_loaded(plain)
    gathered = {name: param.detach() for name, param in stacked.named_parameters()}  # as DeepSpeed collects them
    assert gathered["transformer.blocks.1.ffn.experts.mlp.v1"].dim() == 3
    flatten_state_dict(stacked, gathered)
    assert all(torch.equal(gathered[key], checkpoint[key]) for key in gathered)


# Two gloo processes: DBRX loaded as moetune loads it, each block and the model sharded with FSDP2 (torch's
# fully_shard, what `--accelerate fsdp2` applies on GPUs), a forward and backward, then the full state dict that a
# save writes: DBRX's own 2-D names and shapes, equal to the checkpoint's tensors.
FSDP2_WORKER = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
from transformers import AutoModelForCausalLM
from finetune.modeling.loading import set_up_loaded
dist.init_process_group("gloo")
plain = AutoModelForCausalLM.from_pretrained(sys.argv[1])
saved = {key: tensor.clone() for key, tensor in plain.state_dict().items()}
model = set_up_loaded(plain)
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for block in model.transformer.blocks:
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
model(torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
assert all(p.grad is not None for p in model.parameters())
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if dist.get_rank() == 0:
    assert set(state) == set(saved) and all(torch.equal(state[key], saved[key]) for key in saved)
    print("fsdp2 state dict as the checkpoint")
dist.barrier()  # neither process leaves the group while the other still uses it
dist.destroy_process_group()
"""


@pytest.mark.skipif(os.environ.get("MOETUNE_ALL_FAMILIES") != "1", reason="two processes: runs with the "
                    "conformance matrix (MOETUNE_ALL_FAMILIES=1)")
def test_dbrx_sharded_by_fsdp2_trains_and_saves_as_the_checkpoint(tokenizer, tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(init_config(dbrx_init(), tokenizer)).save_pretrained(tmp_path / "base")
    (tmp_path / "worker.py").write_text(FSDP2_WORKER)
    root = Path(__file__).parents[1]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(tmp_path / "worker.py"), str(tmp_path / "base")], capture_output=True, text=True,
                            timeout=300, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0 and "fsdp2 state dict as the checkpoint" in result.stdout, result.stderr[-3000:]
