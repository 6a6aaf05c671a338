"""Expert parallelism (model.expert_parallel): experts split across 2 CPU processes (gloo) through transformers'
DistributedConfig, trained through `moetune run --accelerate ep`, compared with one process holding every expert.

The one-process run sees the same global batch as 2 micro-batches (gradient_accumulation_steps=2), so the two runs
differ only in the order floats are summed: FSDP2 averages the dense gradients across processes and the experts'
gradients arrive through the all-to-all's backward, where one process sums its accumulation steps.
"""

import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetune.cli import main
from finetune.modeling import expert_parallel
from finetune.config.recipe import ModelConfig
from finetune.core.rundir import StageError
from helpers.processes import output_lines, run_subprocess
from helpers.recipes import write_recipe

# No router aux loss in the comparisons: it is computed per forward pass and is not linear in the batch (see
# test_distributed.NO_AUX_LOSS).
NO_AUX = ["sft.router_aux_loss_coef=0", "dpo.router_aux_loss_coef=0"]
EP = ["model.expert_parallel=2", "model.lora=null", *NO_AUX]  # full fine-tuning in both stages
# LoRA in both stages (DPO's base: the SFT adapter merged into the split weights) on every role that takes it under
# EP, on Qwen2-MoE, whose layers hold routed experts and a shared expert.
EP_LORA = ["model.expert_parallel=2", "model.lora.targets=[attention,experts,shared_experts]",
           "model.lora.stages=[sft,dpo]", *NO_AUX]
# Measured on this CPU: 1e-7 (SFT weights) and 1e-6 (DPO weights, Adam's first steps magnify rounding).
TOLERANCE = 1e-5


def launch(recipe, stages, *overrides, port):
    return [sys.executable, "-m", "finetune", "run", str(recipe), "--stages", stages, "--accelerate", "ep",
            "--num-processes", "2", "--main-process-port", str(port), *overrides]


def history(run, stage, key):
    return [(entry["step"], entry[key]) for entry in json.loads((run / stage / "metrics.json").read_text())
            if key in entry]


def max_difference(file_a, file_b):
    a, b = load_file(str(file_a)), load_file(str(file_b))
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_split_experts_train_sft_and_dpo_like_one_process(tmp_path):
    (tmp_path / "split").mkdir()
    split = write_recipe(tmp_path / "split", architecture="qwen3_moe")
    out = run_subprocess(launch(split, "prep,sft,dpo", *EP, port=29641), timeout=400)
    for stage in ("sft", "dpo"):  # each process holds half of every layer's experts, and says which
        assert f"[{stage}] process 0: experts 0-1 of 4 in each of 1 MoE layers (model.expert_parallel 2)" in out
        assert f"[{stage}] process 1: experts 2-3 of 4 in each of 1 MoE layers (model.expert_parallel 2)" in out
    (tmp_path / "one").mkdir()
    one = write_recipe(tmp_path / "one", architecture="qwen3_moe")
    assert main(["run", str(one), "--stages", "prep,sft,dpo", *EP,
                 "sft.gradient_accumulation_steps=2", "dpo.gradient_accumulation_steps=2"]) == 0
    split_run, one_run = split.parent / "run", one.parent / "run"
    for stage in ("sft", "dpo"):  # the saved weights are gathered whole: one ordinary safetensors model
        assert max_difference(split_run / stage / "model.safetensors", one_run / stage / "model.safetensors") \
            <= TOLERANCE
        split_losses, one_losses = history(split_run, stage, "loss"), history(one_run, stage, "loss")
        assert [s for s, _ in split_losses] == [s for s, _ in one_losses] and len(split_losses) >= 3
        assert all(a == pytest.approx(b, abs=TOLERANCE) for (_, a), (_, b) in zip(split_losses, one_losses))
        # Expert load is counted where the router runs (every process, its own tokens) and summed over processes.
        split_load = json.loads((split_run / stage / "expert_load.json").read_text())["history"]
        one_load = json.loads((one_run / stage / "expert_load.json").read_text())["history"]
        assert [h["share"] for h in split_load] == [h["share"] for h in one_load]
    assert history(split_run, "sft", "loss")[-1][1] < history(split_run, "sft", "loss")[0][1]


def load_adapter_on_one_process(run, stage):
    """The stage's saved adapter on its whole base, as a user would load it: PeftModel.from_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(run / "base"), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run / stage)).eval()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_lora_on_split_experts_trains_sft_then_dpo_like_one_process(tmp_path):
    """LoRA on attention, routed experts and shared experts with the experts split: the experts' adapters applied by
    the process holding each expert, a LoRA DPO on the SFT adapter merged into the split weights; the same losses
    and adapters as one process, and the saved adapter is an ordinary PEFT adapter of the whole model."""
    from transformers import AutoTokenizer

    from helpers.tiny import batch

    runs = {}
    for name in ("split", "one"):
        (tmp_path / name).mkdir()
        runs[name] = write_recipe(tmp_path / name, architecture="qwen2_moe")
    out = run_subprocess(launch(runs["split"], "prep,sft,dpo", *EP_LORA, port=29646), timeout=400)
    assert main(["run", str(runs["one"]), "--stages", "prep,sft,dpo", *EP_LORA,
                 "sft.gradient_accumulation_steps=2", "dpo.gradient_accumulation_steps=2"]) == 0
    split_run, one_run = tmp_path / "split/run", tmp_path / "one/run"
    for stage in ("sft", "dpo"):
        split_adapter = load_file(str(split_run / stage / "adapter_model.safetensors"))
        experts_b = [name for name in split_adapter if ".mlp.experts." in name and "lora_B" in name]
        assert len(experts_b) == 2 and all(split_adapter[name].abs().max() > 0 for name in experts_b)  # trained
        assert any(".shared_expert." in name for name in split_adapter)
        assert max_difference(split_run / stage / "adapter_model.safetensors",
                              one_run / stage / "adapter_model.safetensors") <= TOLERANCE
        # The experts' factors are split with their experts: each process holds half of the elements one process
        # holds (the whole tensors, as saved), and trains only those.
        one_adapter = load_file(str(one_run / stage / "adapter_model.safetensors"))
        whole = sum(tensor.numel() for name, tensor in one_adapter.items() if ".mlp.experts." in name)
        for process in (0, 1):
            assert f"process {process} holds {whole // 2} of the {whole} elements of the routed experts' LoRA " \
                   f"factors" in out
        split_losses, one_losses = history(split_run, stage, "loss"), history(one_run, stage, "loss")
        assert [s for s, _ in split_losses] == [s for s, _ in one_losses] and len(split_losses) >= 3
        assert all(a == pytest.approx(b, abs=TOLERANCE) for (_, a), (_, b) in zip(split_losses, one_losses))
        split_load, one_load = (json.loads((run / stage / "expert_load.json").read_text())["history"]
                                for run in (split_run, one_run))
        assert [h["share"] for h in split_load] == [h["share"] for h in one_load]  # summed over processes
    assert out.count("elements of the routed experts' LoRA factors") == 4  # each stage, each process
    assert history(split_run, "dpo", "loss")[-1][1] < history(split_run, "dpo", "loss")[0][1]
    inputs = batch(AutoTokenizer.from_pretrained(str(one_run / "base")))
    with torch.no_grad():
        split_logits = load_adapter_on_one_process(split_run, "sft")(**inputs).logits
        one_logits = load_adapter_on_one_process(one_run, "sft")(**inputs).logits
    assert (split_logits - one_logits).abs().max().item() <= TOLERANCE


def kill_whole_run(command, step, log_file):
    """Start a 2-process launch and SIGKILL the launcher and both training processes once `step` is logged (torchrun
    starts each process in its own session, so killing the launcher's group alone would leave them running)."""
    logged = 0
    with open(log_file, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in output_lines(process, seconds=300):
            logged += line.startswith("{'loss'")
            if logged == step:
                for pid in [*descendants(process.pid), process.pid]:
                    os.kill(pid, signal.SIGKILL)
                break
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended before step {step}; see {log_file}"


def descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("architecture, layout, saved, port", [
    ("qwen3_moe", EP, "model.safetensors", 29643),
    ("qwen2_moe", EP_LORA, "adapter_model.safetensors", 29650),
], ids=["full", "lora"])
def test_killed_split_run_resumes_to_the_same_weights(tmp_path, architecture, layout, saved, port):
    """kill -9 of every process mid-run; the re-run resumes from the newest sealed checkpoint (weights gathered, or
    the adapter, and each process's optimizer shards) and ends bit-identical to an uninterrupted run."""
    schedule = ["sft.max_steps=12", "sft.logging_steps=1", "checkpoints.every_minutes=0.0005"]
    recipes = {}
    for name in ("whole", "killed"):
        (tmp_path / name).mkdir()
        recipes[name] = write_recipe(tmp_path / name, architecture=architecture)
        assert main(["prep", str(recipes[name])]) == 0
    run_subprocess(launch(recipes["whole"], "sft", *layout, *schedule, port=port), timeout=400)
    kill_whole_run(launch(recipes["killed"], "sft", *layout, *schedule, port=port + 1), 7, tmp_path / "killed.log")
    work = tmp_path / "killed" / "run" / ".sft.partial"
    assert any((path / "optimizer_shards").is_dir() for path in work.glob("checkpoint-*"))
    out = run_subprocess(launch(recipes["killed"], "sft", *layout, *schedule, port=port + 2), timeout=400)
    assert "resuming from" in out
    whole, killed = load_file(str(tmp_path / "whole/run/sft" / saved)), load_file(str(tmp_path / "killed/run/sft" / saved))
    assert whole.keys() == killed.keys() and all(torch.equal(whole[k], killed[k]) for k in whole)
    assert history(tmp_path / "killed/run", "sft", "loss") == history(tmp_path / "whole/run", "sft", "loss")


# ---------------------------------------------------------------- what is refused, and the layout, without processes

@pytest.mark.parametrize("override, message", [
    ("model.lora.targets=[attention,router]", "LoRA on the router weight"),
    ("model.quantization={bits: 4}", "model.expert_parallel and model.quantization do not combine"),
    ("model.expert_parallel=0", "model.expert_parallel is 0; it must be a positive integer"),
])
def test_layouts_the_libraries_cannot_run_are_refused_before_any_work(tmp_path, capsys, override, message):
    recipe = write_recipe(tmp_path)
    extra = ["model.lora.stages=[sft]"] if "quantization" in override else []
    assert main(["run", str(recipe), "model.expert_parallel=2", *extra, override]) == 2
    err = capsys.readouterr().err
    assert message in err and "tiny.yaml" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_distributed_config_splits_experts_and_shards_the_rest(monkeypatch):
    model = ModelConfig(init=None, name_or_path="x", expert_parallel=2)
    assert expert_parallel.distributed_config(model) is None  # one process: the whole model, the same math
    monkeypatch.setenv("WORLD_SIZE", "4")
    config = expert_parallel.distributed_config(model)
    # FSDP2 over all 4 for the dense weights; experts in 2 groups, each expert FSDP-sharded over its 2 holders.
    assert (config.fsdp_size, config.ep_size, config.tp_size, config.efsdp_size) == (4, 2, 1, 2)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(StageError, match="must be a multiple of it"):
        expert_parallel.distributed_config(model)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(StageError, match="not a DeepSpeed or FSDP accelerate config"):
        expert_parallel.distributed_config(model)


@pytest.mark.parametrize("architecture", ["mixtral", "qwen3_moe", "olmoe"])
def test_families_have_an_expert_plan_and_uneven_splits_are_refused(architecture):
    from helpers.tiny import tiny_model

    config = tiny_model(architecture)[0].config  # 4 experts per layer
    expert_parallel.check_experts_divide(config, 2)
    assert set(config.base_model_ep_plan.values()) == {"grouped_gemm", "ep_dispatch_experts"}
    with pytest.raises(StageError, match="4 experts per MoE layer: they cannot be split evenly"):
        expert_parallel.check_experts_divide(config, 3)


def test_trl_hashes_split_weights_as_it_hashes_whole_ones(tmp_path):
    """TRL's model hash (its reference-log-prob cache key) reads `.numpy()`, which DTensors refuse; while the DPO
    trainer is built it hashes the gathered weights: the digest of the same weights held whole."""
    import torch.distributed as dist
    import trl.trainer.dpo_trainer as dpo_trainer
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from helpers.tiny import tiny_model

    model = tiny_model("qwen3_moe")[0]
    whole_digest = dpo_trainer.hash_module(model)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, torch.nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)])))
        with pytest.raises(RuntimeError, match="not supported for tensor subclasses"):
            dpo_trainer.hash_module(model)
        model._is_distributed_loading_by_transformers = True  # what from_pretrained(distributed_config=...) sets
        with expert_parallel.hashable_weights(model):
            assert dpo_trainer.hash_module(model) == whole_digest
        assert dpo_trainer.hash_module.__module__ == "trl.trainer.utils"  # TRL's own again afterwards
    finally:
        dist.destroy_process_group()


def test_split_expert_lora_adds_the_local_experts_update_as_peft_adds_the_whole(tmp_path):
    """In one process (a gloo group of 1, transformers' expert plan applied on a 1-process `ep` mesh, so the experts
    are DTensors run through the expert-parallel forward): the LoRA wrapper of split experts gives PEFT's logits and
    adapter gradients on the whole model, its adapter saves as PEFT's, and merging it into the split weights gives
    PEFT's merged model."""
    import torch.distributed as dist
    from peft import PeftModel, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    from finetune.config.recipe import LoraConfig
    from finetune.modeling import adapters, split_expert_lora
    from helpers.tiny import batch, tiny_model

    lora = LoraConfig(targets=["attention", "experts", "shared_experts"], r=4, alpha=8)

    def adapted(model):
        peft_model = get_peft_model(model, adapters.peft_config(model, lora))
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:  # B is zero at creation: random factors make every update count
                    # (a split factor's part on a 1-process mesh is the whole tensor)
                    local = param.to_local() if expert_parallel.is_dtensor(param) else param
                    local.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        return peft_model

    whole, tokenizer = tiny_model("qwen2_moe")
    split, fresh = copy.deepcopy(whole), copy.deepcopy(whole)
    inputs = batch(tokenizer)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
        plan = split.model._expand_parallel_plan(split.config.base_model_ep_plan)  # names within split.model
        apply_expert_parallelism(split.model, mesh, mesh, plan)
        split._is_distributed_loading_by_transformers = True  # what from_pretrained(distributed_config=...) sets
        whole_peft, split_peft = adapted(whole), adapted(split)
        assert sum(type(m) is split_expert_lora.SplitExpertsLora for m in split_peft.modules()) == 4  # 2 per layer
        # the experts' factors are split with their experts (whole here: a 1-process mesh), the others plain tensors
        factors = {name: param for name, param in split_peft.named_parameters() if "lora_" in name}
        assert {name for name, param in factors.items() if expert_parallel.is_dtensor(param)} == {
            name for name in factors if ".mlp.experts." in name} != set()
        whole_peft(**inputs).logits.pow(2).mean().backward()
        split_logits = split_peft(**inputs).logits
        split_logits.pow(2).mean().backward()
        with torch.no_grad():
            assert torch.allclose(split_logits, whole_peft(**inputs).logits, atol=1e-6)
        whole_grads = {name: p.grad for name, p in whole_peft.named_parameters() if p.requires_grad}
        split_grads = {name: expert_parallel.whole_tensor(p.grad) for name, p in split_peft.named_parameters()
                       if p.requires_grad}
        assert whole_grads.keys() == split_grads.keys()
        assert all(torch.allclose(split_grads[n], whole_grads[n], atol=1e-7) for n in whole_grads)
        split_peft.save_pretrained(tmp_path / "adapter")
        merged = split_expert_lora.merge_adapter(split_peft.unload(), tmp_path / "adapter")
        expected = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).merge_and_unload()
        with torch.no_grad():
            assert torch.allclose(merged(**inputs).logits, expected(**inputs).logits, atol=1e-5)
    finally:
        dist.destroy_process_group()
