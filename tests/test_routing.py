"""Routing telemetry: drift against the reference on a held-out probe, chosen vs rejected routing, expert-load
alarms (finetune/training/routing_drift.py, finetune/training/expert_load.py), through the CLI as users run it."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from finetune.cli import main
from finetune.config.recipe import LoraConfig, RoutingConfig
from finetune.core import families
from finetune.modeling import adapters, moe
from finetune.training import routing_drift
from finetune.training.expert_load import LoadAlarms
from finetune.training.packed_forward import use_block_attention
from helpers import recipes
from helpers.recipes import NO_AUX_LOSS, run_cli
from helpers.processes import kill_at_random_step, moetune, needs_deepspeed
from helpers.tiny import batch, tiny_model

def write_recipe(folder, architecture="mixtral", **routing):
    """The end-to-end tests' tiny recipe, two MoE layers wide enough to route: SFT trains every weight of a random
    model (the router included) at a high learning rate; DPO trains LoRA adapters on attention and experts only
    (the router frozen). Every probe sequence is kept (max_overhead: null), so the numbers do not depend on the
    machine's speed."""
    folder.mkdir(parents=True, exist_ok=True)
    path = recipes.write_recipe(folder, architecture)
    raw = yaml.safe_load(path.read_text())
    raw["model"]["init"].update(hidden_size=64, intermediate_size=64, num_layers=2)
    raw["data"]["sources"][0]["options"]["pairs"] = 120
    raw["data"]["test_size"] = 0.2
    raw["sft"].update(max_steps=12, learning_rate=3.0e-3, logging_steps=3)
    raw["dpo"]["max_steps"] = 4
    raw["routing"] = {"probe_sequences": 16, "max_overhead": None, "pair_sample": 16, **routing}
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def drift_run(tmp_path_factory):
    recipe = write_recipe(tmp_path_factory.mktemp("routing"))
    out = run_cli(["run", str(recipe), "--stages", "prep,sft,dpo"])  # in this process: no second start of the libraries
    return recipe, recipe.parent / "run", out


def drift_of(run, stage):
    return json.loads((run / stage / "routing_drift.json").read_text())


@pytest.mark.slow
def test_an_unfrozen_router_drifts_and_a_frozen_one_barely(drift_run):
    _, run, out = drift_run
    sft, dpo = drift_of(run, "sft"), drift_of(run, "dpo")
    overlap = [entry["routing_overlap"] for entry in sft["history"]]
    kl = [entry["routing_kl"] for entry in sft["history"]]
    assert [entry["step"] for entry in sft["history"]] == [3, 6, 9, 12]
    assert overlap[-1] < overlap[0] < 0.9 and kl[-1] > kl[0] > 1e-3  # full fine-tuning moves the router
    assert all(entry["routing_overlap"] > 0.9 and entry["routing_kl"] < 1e-4 for entry in dpo["history"])
    assert len(dpo["history"]) == 4 and set(dpo["layers"]) == set(dpo["history"][-1]["layers"]) == \
        {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}
    # The means are logged with the trainer's metrics, at every logged step.
    logged = [e for e in json.loads((run / "sft" / "metrics.json").read_text()) if "loss" in e]
    assert [e["routing_overlap"] for e in logged] == overlap
    assert sft["probe"]["kept"] == sft["probe"]["sequences"] == 16 and sft["probe"]["overhead"] > 0
    assert out.count("[sft] routing probe: 16 of 16 held-out sequences") == 1
    # Chosen vs rejected, per layer, before and after DPO (and none for SFT, which has no pairs).
    pairs = dpo["chosen_vs_rejected"]
    assert set(pairs) == {"before", "after"} and not sft["chosen_vs_rejected"]
    for layer in dpo["layers"]:
        assert 0 <= pairs["before"][layer]["js"] <= 0.7 and sum(pairs["after"][layer]["chosen"]) == pytest.approx(1)
    assert not list(run.glob("*/routing_reference*"))  # only needed to resume; not left in the outputs


@pytest.mark.slow
def test_report_draws_the_drift_and_lists_chosen_vs_rejected_and_alarms(drift_run):
    from PIL import Image

    _, run, _ = drift_run
    report = (run / "report.md").read_text()
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert {"report/sft_routing_drift.png", "report/dpo_routing_drift.png"} <= set(images)
    for image in images:
        with Image.open(run / image) as png:
            assert png.format == "PNG" and png.width > 300
    assert "| layer | before | after |" in report and "| layer 1 |" in report
    assert report.count("Expert-load alarms (dead: share under 0.1x uniform, hot: over 3.0x uniform") == 2
    assert "Routing probe: 16 of 16 held-out sequences every log" in report


@pytest.mark.slow
def test_telemetry_off_trains_the_same_weights_with_the_same_losses(drift_run, tmp_path):
    recipe, run, _ = drift_run
    off = write_recipe(tmp_path, probe_sequences=0, pair_sample=0)
    for stage in ("data", "base"):
        shutil.copytree(run / stage, tmp_path / "run" / stage)
    run_cli(["run", str(off), "--stages", "sft,dpo"])
    for stage, weights in (("sft", "model.safetensors"), ("dpo", "adapter_model.safetensors")):
        assert not (tmp_path / "run" / stage / "routing_drift.json").exists()
        on, off = (load_file(str(folder / stage / weights)) for folder in (run, tmp_path / "run"))
        assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on), stage
        logs = [[(e["step"], e["loss"], e["grad_norm"]) for e in json.loads((folder / stage / "metrics.json")
                 .read_text()) if "loss" in e] for folder in (run, tmp_path / "run")]
        assert logs[0] == logs[1] and len(logs[0]) >= 4  # the gradients' norms too, step by step


@pytest.mark.slow
def test_an_expert_forced_dead_is_named_once_within_alarm_logs(tmp_path):
    # DeepSeek-V3 chooses experts by score + e_score_correction_bias (a buffer no gradient moves): a very negative
    # bias means never chosen. The SFT result gets one; DPO (LoRA) trains on it and must name that expert.
    recipe = write_recipe(tmp_path, "deepseek_v3", alarm_logs=2, probe_sequences=0, pair_sample=0)
    assert main(["run", str(recipe), "--stages", "prep,sft", "sft.max_steps=1"]) == 0
    weights = tmp_path / "run" / "sft" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"][2] = -1e4
    save_file(tensors, str(weights), metadata={"format": "pt"})
    out = run_cli(["dpo", str(recipe)])
    alarm = "[dpo] expert-load alarm at step 2: dead expert 2 in model.layers.1.mlp.gate"
    assert out.count(alarm) == 1 and out.count("expert-load alarm") == 1
    load = json.loads((tmp_path / "run" / "dpo" / "expert_load.json").read_text())
    assert [(a["kind"], a["layer"], a["expert"], a["step"]) for a in load["alarms"]] == \
        [("dead", "model.layers.1.mlp.gate", 2, 2)]
    assert "- step 2: dead expert 2 in layer 1 (model.layers.1.mlp.gate), share 0.0000" in \
        (tmp_path / "run" / "report.md").read_text()


# ---------------------------------------------------------------- the parts, in process

def test_alarm_names_each_expert_once_after_its_streak():
    alarms = LoadAlarms(RoutingConfig(alarm_logs=2), "dpo")
    dead, hot, fine = [0.01, 0.33, 0.33, 0.33], [0.9, 0.05, 0.05, 0.0], [0.25] * 4
    alarms.check(1, {"l": dead})
    assert not alarms.raised
    alarms.check(2, {"l": fine})  # the streak is broken
    alarms.check(3, {"l": dead})
    alarms.check(4, {"l": dead})
    alarms.check(5, {"l": dead})
    assert [(a["kind"], a["expert"], a["step"]) for a in alarms.raised] == [("dead", 0, 4)]
    alarms.check(6, {"l": hot})
    alarms.check(7, {"l": hot})
    assert [(a["kind"], a["expert"], a["step"]) for a in alarms.raised[1:]] == [("hot", 0, 7), ("dead", 3, 7)]


def test_drift_measures_of_equal_disjoint_and_moved_routing():
    log_probs = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0]]), dim=-1)
    top_k = torch.tensor([[0, 1], [1, 2]])
    assert drift_sums_per_token((log_probs, top_k), (log_probs, top_k)) == [1, 0, 0]
    flipped = torch.flip(log_probs, dims=[1])
    overlap, kl, changed = drift_sums_per_token((flipped, torch.tensor([[3, 2], [2, 1]])), (log_probs, top_k))
    assert overlap == 0.5 and changed == 1  # token 0: disjoint sets; token 1: the same set, its top-1 swapped
    expected = (flipped.exp() * (flipped - log_probs)).sum(1).mean()
    assert kl == pytest.approx(float(expected))


def drift_sums_per_token(policy, reference):
    sums = routing_drift.drift_sums(policy, reference)
    return [float(sums[0] / sums[3]), float(sums[1] / sums[3]), float(sums[2] / sums[3])]


def test_top1_is_the_chosen_expert_with_the_highest_logit_even_when_unsorted():
    log_probs = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0, 3.0]]), dim=-1)
    assert routing_drift.top1(log_probs, torch.tensor([[1, 3]])).tolist() == [3]
    assert routing_drift.top1(log_probs, torch.tensor([[2, 1]])).tolist() == [1]


def test_js_divergence_is_zero_for_equal_loads_and_ln2_for_disjoint_ones():
    assert routing_drift.js_divergence(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])) == 0
    disjoint = routing_drift.js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert disjoint == pytest.approx(0.6931, 1e-4)


def test_probe_reads_the_same_routing_on_a_model_set_up_for_padding_free_batches():
    model, tokenizer = tiny_model()
    inputs = batch(tokenizer)
    sequences = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    capture = routing_drift.RouterCapture(families.family_of(model), moe.routers(model), moe.routing_sizes(model))
    padded = list(routing_drift.routed(model, capture, sequences, "cpu", tokenizer.pad_token_id, 2))
    use_block_attention(model)  # what speed.padding_free does to the trained model
    model.train()
    blocks = list(routing_drift.routed(model, capture, sequences, "cpu", tokenizer.pad_token_id, 2))
    assert model.training  # the probe puts the mode back
    tokens = sum(len(ids) for ids in sequences)
    for a, b in zip(padded, blocks):
        for layer in a:
            assert torch.allclose(a[layer][0], b[layer][0], atol=1e-6) and torch.equal(a[layer][1], b[layer][1])
    assert sum(batch_[layer][0].shape[0] for batch_ in padded for layer in list(batch_)[:1]) == tokens


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two DPO runs: about a minute on a quiet machine, 10 on a crowded one
def test_a_resumed_run_measures_drift_against_the_reference_recorded_at_its_start(drift_run, tmp_path):
    """The whole run is drift_run's DPO (same recipe, 4 steps, in one go); this one saves every 2 steps, is killed at
    step 3 and resumed from step 2's checkpoint: it must read the reference its start recorded, not re-record it."""
    _, run, _ = drift_run
    schedule = ["dpo.save_strategy=steps", "dpo.save_steps=2"]  # checkpoints change no number
    recipe = write_recipe(tmp_path)
    for stage in ("data", "base", "sft"):
        shutil.copytree(run / stage, tmp_path / "run" / stage)
    kill_at_random_step("dpo", str(recipe), schedule, tmp_path / "killed.log", first=3, last=3)
    assert list((tmp_path / "run" / ".dpo.partial").glob("routing_reference.rank0.safetensors"))
    assert "resuming from" in moetune("dpo", str(recipe), *schedule)
    whole, resumed = (drift_of(folder, "dpo")["history"] for folder in (run, tmp_path / "run"))
    assert [entry["step"] for entry in resumed] == [entry["step"] for entry in whole] == list(range(1, 5))
    for a, b in zip(whole, resumed):
        assert b["routing_overlap"] == pytest.approx(a["routing_overlap"], abs=1e-5)
        assert b["routing_kl"] == pytest.approx(a["routing_kl"], rel=1e-3, abs=1e-9)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["ddp", "fsdp2"])
def test_two_processes_probe_half_each_and_sum_to_the_one_process_numbers(drift_run, tmp_path, layout):
    """ddp, and fsdp2 as a CPU runs it: accelerate runs an FSDP launch without GPUs as DDP, and moetune says so
    (sharded FSDP2 weights: test_fsdp2_sharded_weights_...)."""
    _, run, _ = drift_run
    recipe = write_recipe(tmp_path)
    for stage in ("data", "base", "sft"):
        shutil.copytree(run / stage, tmp_path / "run" / stage)
    out = moetune("dpo", str(recipe), "--accelerate", layout, "--num-processes", "2", "--main-process-port", "0")
    one, two = drift_of(run, "dpo"), drift_of(tmp_path / "run", "dpo")
    assert out.count("[dpo] routing probe: 16 of 16 held-out sequences") == 1  # rank 0 reports and writes
    assert ("[fsdp] no GPUs: accelerate runs FSDP launches on CPUs as plain DDP" in out) == (layout == "fsdp2")
    assert [entry["step"] for entry in two["history"]] == [1, 2, 3, 4]
    # Before training both see the same model: each process's half of the pairs, summed, gives the same loads.
    for layer, before in one["chosen_vs_rejected"]["before"].items():
        for side in ("chosen", "rejected", "js"):
            assert two["chosen_vs_rejected"]["before"][layer][side] == pytest.approx(before[side], abs=1e-6)
    assert all(entry["routing_overlap"] > 0.9 for entry in two["history"])


# ---------------------------------------------------------------- sharded weights (FSDP2, ZeRO-3)

def fsdp2_telemetry(out, processes: int, *flags) -> dict:
    """tests/helpers/fsdp2_telemetry.py on `processes` gloo processes (torchrun); its losses.json."""
    tests = Path(__file__).parent
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, *launcher, "-m", "helpers.fsdp2_telemetry", str(out), *flags], env=env,
                          cwd=tests, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "losses.json").read_text())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_sharded_weights_give_the_one_process_figures_and_unchanged_training(tmp_path):
    """FSDP2 (`fully_shard` per decoder layer, as accelerate prepares it) on 2 gloo processes: every process runs the
    probe's forwards (each layer is gathered collectively), its sums are reduced and rank 0 writes. The figures are
    those of one unsharded process; with telemetry off the losses and gradient norms are bit-identical."""
    one = fsdp2_telemetry(tmp_path / "one", 1)
    sharded = fsdp2_telemetry(tmp_path / "fsdp2", 2)
    off = fsdp2_telemetry(tmp_path / "off", 2, "--off")
    assert one["router_shard"] == [4, 64] and sharded["router_shard"] == [2, 64]  # rank 0 holds half the router
    assert [(e["loss"], e["grad_norm"]) for e in sharded["steps"]] == [(e["loss"], e["grad_norm"]) for e in off["steps"]]
    for a, b in zip(sharded["steps"], one["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
        for name in ("routing_overlap", "routing_kl", "routing_top1_changed", "expert_load_cv_mean"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), (a["step"], name)
    assert sharded["steps"][-1]["routing_overlap"] < 0.9  # the router moved: the figures compare something
    drift = [json.loads((tmp_path / run / "routing_drift.json").read_text()) for run in ("fsdp2", "one")]
    for layer, before in drift[1]["chosen_vs_rejected"]["before"].items():
        assert drift[0]["chosen_vs_rejected"]["before"][layer]["chosen"] == pytest.approx(before["chosen"], abs=1e-6)
    assert drift[0]["probe"]["kept"] == 8 and not list((tmp_path / "fsdp2").glob("routing_reference*"))
    loads = [json.loads((tmp_path / run / "expert_load.json").read_text())["history"] for run in ("fsdp2", "one")]
    assert [h["share"] for h in loads[0]] == [h["share"] for h in loads[1]]


# Two ZeRO-3 processes against one process with the same micro-batches (accumulation 2): the weights agree to ~1e-6
# (test_distributed.ZERO3_TOL), so the probe's routing agrees except for a token whose two best experts were nearly
# tied. One such flip moves a layer's overlap or top-1 share by 1/(probe tokens), about 5e-4 here. Measured: overlap,
# top-1 share and expert load equal, KL within 1e-8.
SHARDED_DRIFT_TOL = {"routing_overlap": 2e-3, "routing_top1_changed": 2e-3, "routing_kl": 1e-5}


def largest_drift_difference(a: dict, b: dict) -> dict[str, float]:
    """Per logged figure, the largest difference between two routing_drift.json histories (same steps)."""
    assert [entry["step"] for entry in a["history"]] == [entry["step"] for entry in b["history"]]
    return {name: max(abs(x[name] - y[name]) for x, y in zip(a["history"], b["history"])) for name in SHARDED_DRIFT_TOL}


def losses_and_grad_norms(run, stage):
    return [(e["step"], e["loss"], e["grad_norm"]) for e in json.loads((run / stage / "metrics.json").read_text())
            if "loss" in e]


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(5400)  # three 2-stage runs, two of them on 2 processes: about 1 minute on a quiet 2-core CPU
def test_zero3_probes_sharded_weights_like_one_process_and_training_is_unchanged(tmp_path):
    """ZeRO-3 on 2 gloo processes: SFT trains every weight (the router too) in shards, DPO trains LoRA on a sharded
    base. Every process runs the probe's forwards (ZeRO-3 gathers each layer collectively), the sums are reduced,
    rank 0 writes: the figures are those of one process; with telemetry off the losses and gradients are the same."""
    short = ["sft.max_steps=6", "sft.logging_steps=2", "dpo.max_steps=2", *NO_AUX_LOSS]
    zero3 = ["--accelerate", "zero3", "--num-processes", "2", "--main-process-port", "0", *short]
    runs = {}
    for name, overrides in (("one", ["sft.gradient_accumulation_steps=2", "dpo.gradient_accumulation_steps=2",
                                     *short]),
                            ("zero3", zero3), ("zero3-off", [*zero3, "routing.probe_sequences=0",
                                                            "routing.pair_sample=0"])):
        recipe = write_recipe(tmp_path / name)
        if name != "one":
            for stage in ("data", "base"):
                shutil.copytree(runs["one"][0] / stage, tmp_path / name / "run" / stage)
        out = moetune("run", str(recipe), "--stages", "sft,dpo" if name != "one" else "prep,sft,dpo", *overrides,
                      timeout=2400)
        runs[name] = (tmp_path / name / "run", out)
    (one, _), (sharded, out), (off, _) = runs["one"], runs["zero3"], runs["zero3-off"]
    assert out.count("[zero3] MoE blocks gathered whole (ZeRO-3 leaf modules): MixtralSparseMoeBlock") == 2
    for stage in ("sft", "dpo"):
        assert out.count(f"[{stage}] routing probe: 16 of 16 held-out sequences") == 1  # rank 0 reports
        differences = largest_drift_difference(drift_of(sharded, stage), drift_of(one, stage))
        assert all(differences[name] <= tol for name, tol in SHARDED_DRIFT_TOL.items()), (stage, differences)
        assert losses_and_grad_norms(sharded, stage) == losses_and_grad_norms(off, stage), stage
        assert not (off / stage / "routing_drift.json").exists()
        loads = [json.loads((run / stage / "expert_load.json").read_text())["history"] for run in (sharded, one)]
        for a, b in zip(*loads):
            for layer in a["share"]:
                assert a["share"][layer] == pytest.approx(b["share"][layer], abs=1e-3), (stage, a["step"])
    # Before DPO both see the same SFT model up to ZeRO-3's rounding: each process's half of the pairs, summed.
    for layer, before in drift_of(one, "dpo")["chosen_vs_rejected"]["before"].items():
        sharded_before = drift_of(sharded, "dpo")["chosen_vs_rejected"]["before"][layer]
        assert sharded_before["chosen"] == pytest.approx(before["chosen"], abs=1e-3)
    assert not [p for p in sharded.rglob("*") if p.name.endswith((".tmp", ".partial")) or "routing_reference" in p.name]


# ---------------------------------------------------------------- the router role with NF4 experts

@pytest.mark.slow
def test_router_role_on_nf4_experts_trains_in_sft_and_dpo_and_merges(tmp_path):
    """QLoRA (`model.quantization`: NF4 experts) with `router` in model.lora.targets: the router's adapter trains in
    SFT, DPO continues it on the 4-bit base, it saves as PEFT's own and `moetune merge` adds it to the full-precision
    router (the router itself is never quantized: bitsandbytes reaches Linear layers only, the router is a bare
    Parameter)."""
    recipe = recipes.write_recipe(tmp_path)
    run_cli(["run", str(recipe), "--stages", "prep,sft,dpo", "model.lora.stages=[sft,dpo]", "model.quantization.bits=4",
             "model.lora.targets=[attention,experts,router]", "model.init.hidden_size=64",
             "model.init.intermediate_size=64", "sft.max_steps=2", "dpo.max_steps=1", "sft.learning_rate=1.0e-2",
             "dpo.learning_rate=1.0e-2"])
    run, gate = tmp_path / "run", "base_model.model.model.layers.0.mlp.gate"
    factors = {}
    for stage in ("sft", "dpo"):
        assert "mlp.gate.weight" in json.loads((run / stage / "adapter_config.json").read_text())["target_parameters"]
        tensors = load_file(str(run / stage / "adapter_model.safetensors"))
        factors[stage] = [tensors[f"{gate}.lora_{part}.weight"].float() for part in "AB"]
    assert factors["sft"][1].abs().max() > 0  # B starts at zero: the router's adapter trained
    assert not torch.equal(factors["sft"][1], factors["dpo"][1])  # and DPO trained it further
    run_cli(["merge", str(run / "dpo"), "--out", str(tmp_path / "merged")])
    from transformers import AutoModelForCausalLM

    base, merged = (AutoModelForCausalLM.from_pretrained(str(folder)) for folder in (run / "base", tmp_path / "merged"))
    (name, router), merged_router = next(iter(moe.routers(base).items())), next(iter(moe.routers(merged).values()))
    delta = moe.router_weight(merged, name, merged_router) - moe.router_weight(base, name, router)
    a, b = factors["dpo"]
    torch.testing.assert_close(delta, 8 / 4 * b @ a, rtol=0, atol=1e-6)  # alpha / r of the tiny recipe


def test_a_router_without_an_expert_row_weight_is_refused_by_name_and_left_out_of_all():
    model, _ = tiny_model()
    name, router = next(iter(moe.routers(model).items()))
    router.weight = torch.nn.Parameter(torch.zeros(model.config.num_local_experts))  # scores without (E, H) rows
    with pytest.raises(ValueError, match=f"router cannot be tuned on this model: its router {name} scores"):
        adapters.peft_config(model, LoraConfig(targets=["attention", "router"]))
    assert "router" not in str(adapters.peft_config(model, LoraConfig(targets=["all"])).target_parameters)

