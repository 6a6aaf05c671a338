"""Several processes: real 2-process SFT and DPO runs on this CPU (DDP over gloo through `accelerate launch`),
compared with 1-process runs, and the shipped launch configs checked through accelerate's own launch code.

`accelerate launch --cpu --num_processes 2` silently runs one process; the ddp config (multi-GPU type) with
moetune's use_cpu default gives two real gloo processes.
"""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetune.core import distributed
from finetune import launch

from finetune.modeling import moe
from finetune.cli import main
from finetune.core.rundir import StageError
from helpers.processes import needs_deepspeed, run_subprocess
from helpers.recipes import NO_AUX_LOSS, write_recipe
from helpers.tiny import ARCHITECTURES, tiny_model

# DDP sums the two processes' gradients where one process sums its accumulation steps: the same numbers added in
# another order, so results agree to float32 rounding (measured: bit-identical on this CPU).
SAME_MICRO_BATCHES_TOL = 1e-6
# One process multiplying batches of 16 where two multiply batches of 8 sums inside the matmuls in another order
# (measured: max difference 3e-7 after 6 SFT + 3 DPO steps).
HALVED_BATCH_TOL = 1e-5
# ZeRO-3 also merges the SFT adapter into gathered shards, and Adam's first steps divide by the root of tiny second
# moments, which magnifies rounding differences (measured 1.3e-6; merging the adapter wrongly gives 4e-3).
ZERO3_TOL = 1e-5


def recipe_in(tmp_path_factory, name, architecture="mixtral"):
    return write_recipe(tmp_path_factory.mktemp(name), architecture)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """prep here, then SFT and DPO on 2 processes through the shorthand (which runs `accelerate launch --config_file
    recipes/accelerate/ddp.yaml ... -m finetune run`); every process checks its weights against the others'."""
    recipe = recipe_in(tmp_path_factory, "two")
    out = run_subprocess([sys.executable, "-m", "finetune", "run", str(recipe), "--stages", "prep,sft,dpo",
                          "--accelerate", "ddp", "--num-processes", "2", "--main-process-port", "0", *NO_AUX_LOSS],
                         **{distributed.CHECK_REPLICAS: "1"})
    return recipe.parent / "run", out


def one_process_run(tmp_path_factory, name, *overrides, architecture="mixtral"):
    recipe = recipe_in(tmp_path_factory, name, architecture)
    assert main(["run", str(recipe), "--stages", "prep,sft,dpo", *NO_AUX_LOSS, *overrides]) == 0
    return recipe.parent / "run"


def assert_same_weights(run_a, run_b, tolerance, sft_weights="model.safetensors", dpo_weights="adapter_model.safetensors"):
    for stage, name in (("sft", sft_weights), ("dpo", dpo_weights)):
        a, b = load_file(str(run_a / stage / name)), load_file(str(run_b / stage / name))
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= tolerance, f"{stage}: max weight difference {worst} > {tolerance}"


@pytest.mark.multiprocess
def test_two_processes_report_the_global_batch_and_write_each_file_once(two_processes):
    run, out = two_processes
    assert "[launch] accelerate launch --config_file" in out and "--num-processes 2" in out
    assert out.count("[sft] global batch 16 = 8 per device x 2 processes x 1 accumulation step") == 1
    assert out.count("[dpo] global batch 8 = 4 per device x 2 processes x 1 accumulation step") == 1
    for stage in ("sft", "dpo"):
        assert out.count(f"== {stage}: ") == 1 and out.count(f"Saved {'full' if stage == 'sft' else 'adapter'} to") == 1
        manifest = json.loads((run / stage / "moetune_stage.json").read_text())
        assert manifest["outputs"]["processes"] == 2 and manifest["outputs"]["global_batch"] in (16, 8)
        assert json.loads((run / stage / "expert_load.json").read_text())["history"]
        assert [e for e in json.loads((run / stage / "metrics.json").read_text()) if "loss" in e]
    leftovers = [p for p in run.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    assert not leftovers


@pytest.mark.multiprocess
def test_both_processes_end_with_identical_weights(two_processes):
    run, out = two_processes
    lines = [line for line in out.splitlines() if "weights identical on all 2 processes" in line]
    assert [line.split()[0] for line in lines] == ["[sft]", "[dpo]"]
    # The digest both processes agreed on is the digest of the saved SFT model.
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(run / "sft"), dtype=torch.float32)
    assert lines[0].rstrip(")").endswith(distributed.weights_digest(saved))


@pytest.mark.multiprocess
def test_two_processes_equal_one_process_with_the_same_micro_batches(two_processes, tmp_path_factory):
    run, _ = two_processes
    one = one_process_run(tmp_path_factory, "accumulation",
                          "sft.gradient_accumulation_steps=2", "dpo.gradient_accumulation_steps=2")
    assert_same_weights(run, one, SAME_MICRO_BATCHES_TOL)
    # Expert load is summed over both processes: the shares equal those of the one process that saw every token.
    for stage in ("sft", "dpo"):
        two_history = json.loads((run / stage / "expert_load.json").read_text())["history"]
        one_history = json.loads((one / stage / "expert_load.json").read_text())["history"]
        assert [h["step"] for h in two_history] == [h["step"] for h in one_history]
        for a, b in zip(two_history, one_history):
            for layer in a["share"]:
                assert a["share"][layer] == pytest.approx(b["share"][layer], abs=1e-6)


@pytest.mark.multiprocess
def test_halved_per_device_batch_equals_one_process(two_processes, tmp_path_factory):
    run, _ = two_processes
    one = one_process_run(tmp_path_factory, "doubled",
                          "sft.per_device_train_batch_size=16", "dpo.per_device_train_batch_size=8")
    assert_same_weights(run, one, HALVED_BATCH_TOL)


@needs_deepspeed
@pytest.mark.multiprocess
def test_zero3_on_two_processes_trains_like_one_process(tmp_path_factory):
    """DeepSpeed ZeRO-3 runs on CPUs too (gloo): sharded weights, MoE blocks as leaves. LoRA in both stages, so DPO
    starts by merging the SFT adapter into a base that ZeRO-3 loaded in shards."""
    adapters_in_both = ["model.lora.stages=[sft,dpo]", *NO_AUX_LOSS]
    recipe = recipe_in(tmp_path_factory, "zero3")
    out = run_subprocess([sys.executable, "-m", "finetune", "run", str(recipe), "--stages", "prep,sft,dpo",
                          "--accelerate", "zero3", "--num-processes", "2", "--main-process-port", "0",
                          *adapters_in_both])
    # once per training stage (printed by the main process only)
    assert out.count("[zero3] MoE blocks gathered whole (ZeRO-3 leaf modules): MixtralSparseMoeBlock") == 2
    one = one_process_run(tmp_path_factory, "zero3-reference", *adapters_in_both,
                          "sft.gradient_accumulation_steps=2", "dpo.gradient_accumulation_steps=2")
    assert_same_weights(recipe.parent / "run", one, ZERO3_TOL, sft_weights="adapter_model.safetensors")


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_trains_dbrx_flat_experts_like_one_process_and_saves_dbrx_checkpoints(tmp_path_factory):
    """DBRX's experts are flat 2-D matrices that ZeRO-3 partitions as the model is built; moetune views them as 3-D
    by changing the partitions' logical shape (finetune/modeling/flat_experts.py). LoRA SFT trains on the
    partitioned experts; full DPO then merges the SFT adapter into the sharded base, trains every weight in shards,
    and DeepSpeed's 16-bit gather saves them in DBRX's own 2-D layout, which transformers' class loads."""
    overrides = ["model.lora.stages=[sft]", *NO_AUX_LOSS]
    recipe = recipe_in(tmp_path_factory, "dbrx-zero3", "dbrx")
    out = run_subprocess([sys.executable, "-m", "finetune", "run", str(recipe), "--stages", "prep,sft,dpo",
                          "--accelerate", "zero3", "--num-processes", "2", "--main-process-port", "0", *overrides])
    assert out.count("[sft] global batch 16 = 8 per device x 2 processes") == 1
    assert "[zero3] MoE blocks gathered whole (ZeRO-3 leaf modules): DbrxFFN" in out
    one = one_process_run(tmp_path_factory, "dbrx-reference", *overrides, "sft.gradient_accumulation_steps=2",
                          "dpo.gradient_accumulation_steps=2", architecture="dbrx")
    run = recipe.parent / "run"
    assert_same_weights(run, one, ZERO3_TOL, sft_weights="adapter_model.safetensors", dpo_weights="model.safetensors")
    from transformers import AutoModelForCausalLM, DbrxForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(run / "dpo"), dtype=torch.float32).eval()
    assert type(saved) is DbrxForCausalLM  # transformers' own class: flat (experts x ffn, hidden) matrices
    ffn = saved.config.ffn_config
    assert saved.transformer.blocks[0].ffn.experts.mlp.w1.shape == (ffn.moe_num_experts * ffn.ffn_hidden_size,
                                                                     saved.config.d_model)
    reference = AutoModelForCausalLM.from_pretrained(str(one / "dpo"), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():  # measured: weights within 3.3e-6 of the one-process run's, logits within 2e-6
        torch.testing.assert_close(saved(ids).logits, reference(ids).logits, rtol=0, atol=ZERO3_TOL)


def test_prep_and_eval_refuse_to_run_once_per_process(tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "prep, eval run in one process, but this is one of 2 processes" in err and "--accelerate CONFIG" in err
    assert not (tmp_path / "run").exists()


def test_shorthand_passes_accelerate_options_and_overrides_apart():
    extra = ["--num-processes", "8", "sft.max_steps=5", "--main_process_ip", "10.0.0.1", "--same_network", "x=1"]
    options, overrides = launch.split_options(extra)
    assert options == ["--num-processes", "8", "--main_process_ip", "10.0.0.1", "--same_network"]
    assert overrides == ["sft.max_steps=5", "x=1"]
    command = launch.launch_command(launch.config_path("zero3"), options, "r.yaml", ["sft", "dpo"], overrides, True)
    assert command[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(launch.CONFIG_DIR / "zero3.yaml")]
    assert command[5:10] == options
    assert command[10:] == ["-m", "finetune", "run", "r.yaml", "--stages", "sft,dpo", *overrides, "--force"]
    with pytest.raises(StageError, match="ddp, ep, fsdp2, zero2, zero3"):
        launch.config_path("zero4")
    assert launch.machine_count(["--num_machines=2"]) == launch.machine_count(["--num-machines", "2"]) == 2


def test_run_on_several_nodes_leaves_prep_and_eval_to_one_process(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    assert main(["run", str(recipe), "--accelerate", "zero3", "--num-machines", "2", "--machine-rank", "1"]) == 2
    assert "prep, eval would run once on every node" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the launch configs, as accelerate reads them

def launch_environment(name, monkeypatch):
    """Run accelerate's `launch` on a shipped config up to where it would start processes; apply their env."""
    import accelerate.commands.launch as accelerate_launch
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    captured = {}
    monkeypatch.setattr(accelerate_launch, "multi_gpu_launcher",
                        lambda args: captured.update(args=args, env=prepare_multi_gpu_env(args)))
    monkeypatch.setattr(accelerate_launch, "deepspeed_launcher",
                        lambda args: captured.update(args=args, env=prepare_deepspeed_cmd_env(args)[1]))
    parser = accelerate_launch.launch_command_parser()
    accelerate_launch.launch_command(parser.parse_args(
        ["--config_file", str(launch.config_path(name)), "--num_processes", "2", "train.py"]))
    for key, value in captured["env"].items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    return captured["args"], captured["env"]


@pytest.mark.parametrize("name", ["ddp", "ep", "zero2", "zero3", "fsdp2"])
def test_configs_leave_precision_and_batch_to_the_recipe(name, monkeypatch):
    args, env = launch_environment(name, monkeypatch)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # else a CPU run would be forced to bf16
    assert args.num_processes == 2  # --num-processes overrides the config's 8
    if name in ("zero2", "zero3"):
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()
        assert plugin.zero_stage == int(name[-1])
        # "auto": the Trainer fills them from the recipe's gradient_accumulation_steps and max_grad_norm
        assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
        assert plugin.gradient_clipping == "auto"
        assert args.deepspeed_multinode_launcher == "standard"  # torchrun per node, no pdsh/ssh needed
    if name == "zero3":
        assert plugin.zero3_init_flag
        assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    if name in ("ddp", "ep"):  # ep: transformers shards the model itself; accelerate only starts the processes
        assert args.multi_gpu and "ACCELERATE_USE_DEEPSPEED" not in env and "ACCELERATE_USE_FSDP" not in env


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fsdp2_wraps_each_decoder_layer(architecture, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    launch_environment("fsdp2", monkeypatch)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.cpu_ram_efficient_loading and plugin.reshard_after_forward
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    model, _ = tiny_model(architecture)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [module for module in model.modules() if policy(module)]
    assert len(wrapped) == model.config.num_hidden_layers
    assert all(type(module).__name__.endswith("DecoderLayer") for module in wrapped)
    # A whole MoE block (router and every expert) lies inside one wrapped unit.
    assert all(any(isinstance(m, cls) for m in layer.modules()) for layer in wrapped
               for cls in moe.moe_block_classes(model))


@needs_deepspeed
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_zero3_makes_each_sparse_moe_block_a_leaf(architecture, monkeypatch):
    import deepspeed.utils as deepspeed_utils
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    model, _ = tiny_model(architecture)
    moe.mark_moe_blocks_as_zero3_leaves(model)  # not ZeRO-3: nothing is marked
    assert not any(deepspeed_utils.z3_leaf_module(m) for m in model.modules())
    launch_environment("zero3", monkeypatch)
    plugin = DeepSpeedPlugin()
    plugin.set_deepspeed_weakref()  # what TrainingArguments does under a ZeRO-3 launch
    try:
        moe.mark_moe_blocks_as_zero3_leaves(model)
    finally:
        unset_hf_deepspeed_config()
    leaves = [type(m).__name__ for m in model.modules() if deepspeed_utils.z3_leaf_module(m)]
    assert leaves == [{"mixtral": "MixtralSparseMoeBlock", "qwen3_moe": "Qwen3MoeSparseMoeBlock",
                       "olmoe": "OlmoeSparseMoeBlock"}[architecture]] * model.config.num_hidden_layers


def test_routers_are_found_in_weights_that_zero3_has_partitioned():
    """ZeRO-3 leaves an empty shard in each parameter outside forward and keeps the real shape in ds_shape."""
    model, _ = tiny_model("mixtral")
    before = moe.moe_block_classes(model), list(moe.routers(model))
    for param in model.parameters():
        param.ds_shape = param.shape
        param.data = torch.empty(0)
    assert (moe.moe_block_classes(model), list(moe.routers(model))) == before
