"""QLoRA on the experts: NF4 expert storage and forward, LoRA over it as a standard PEFT adapter, SFT then DPO."""

import gc
import json
import os
import subprocess
import sys
import weakref

import bitsandbytes as bnb
import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from finetune.modeling import expert_quant, moe
from finetune.cli import main
from finetune.modeling.loading import load_quantized, load_stage_model
from finetune.config.recipe import RecipeError
from finetune.config.parsing import load_recipe, parse_recipe
from helpers.recipes import logged, write_lora_chain_recipe, write_recipe
from helpers.tiny import ARCHITECTURES, batch, tiny_model
from helpers.bnb_kernel_paths import bnb_kernel_path, row_blocked_dequantize_4bit, use_dequantize_kernel  # noqa: F401
from helpers.on_device import DEVICE, DTYPE, SAME_RESULT, relative_error
from helpers.lookalike import FAMILIES, family_config
from helpers.nf4 import dequantized_copy, experts_modules, quantized_copy, random_lora_on

QLORA = ["model.lora.stages=[sft,dpo]", "model.quantization.bits=4", "sft.activation_checkpointing=true",
         "dpo.activation_checkpointing=true", "sft.learning_rate=1.0e-2", "dpo.learning_rate=1.0e-2",
         "model.init.hidden_size=64", "model.init.intermediate_size=64"]  # real models' dims are multiples of 64


def tiny_model_on_device(architecture="mixtral"):
    """The tiny model and a batch where the conformance tests run (tests/helpers/on_device.py)."""
    model, tokenizer = tiny_model(architecture)
    return model.to(DEVICE, DTYPE), tokenizer, batch(tokenizer).to(DEVICE)


@pytest.mark.conformance
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_nf4_experts_match_full_precision_within_nf4_error(architecture, bnb_kernel_path):
    model, tokenizer, inputs = tiny_model_on_device(architecture)
    quantized = quantized_copy(model)
    for full, nf4 in zip(experts_modules(model), experts_modules(quantized)):
        for name in moe.EXPERT_PARAMETERS:
            weights = getattr(full, name)
            rounded = torch.stack([expert_quant.dequantize_expert(nf4, name, e) for e in range(nf4.num_experts)])
            # NF4 with one scale per 64 weights: ~9% relative error on Gaussian weights; never exact.
            assert 0.02 < relative_error(rounded, weights) < 0.12
        hidden = torch.randn(10, full.gate_up_proj.shape[-1], device=DEVICE, dtype=DTYPE)
        top_k_index = torch.randint(0, full.num_experts, (10, 2), device=DEVICE)
        top_k_weights = torch.rand(10, 2, device=DEVICE, dtype=DTYPE)
        with torch.no_grad():  # two NF4 matrices in series: about sqrt(2) times one matrix's error
            assert relative_error(nf4(hidden, top_k_index, top_k_weights), full(hidden, top_k_index, top_k_weights)) < 0.2
    with torch.no_grad():
        expected = model(**inputs).logits
        assert relative_error(quantized(**inputs).logits, expected) < 0.1
        # the forward is exactly the full-precision one on the rounded weights: no other approximation
        assert relative_error(quantized(**inputs).logits, dequantized_copy(model, quantized)(**inputs).logits) < SAME_RESULT


@pytest.mark.parametrize("family", list(FAMILIES))
def test_nf4_experts_run_each_familys_own_expert_math_on_the_rounded_weights(family, tmp_path):
    """gpt-oss (transposed weights, biases, interleaved clamped SwiGLU), DeepSeek-V3 (routed scaling, shared expert),
    Qwen3-MoE, Mixtral: the NF4 model is the family's full-precision forward on NF4-rounded experts, with and without
    LoRA (PEFT's own wrapper on the rounded weights as the reference)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, vocab_size=128), dtype=torch.float32).eval()
    quantized = quantized_copy(model)
    rounded = dequantized_copy(model, quantized)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = quantized(input_ids=ids).logits
        torch.testing.assert_close(logits, rounded(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert 1e-4 < relative_error(logits, model(input_ids=ids).logits) < 0.1  # the rounding is real and small
    peft_model = random_lora_on(quantized)
    peft_model.save_pretrained(tmp_path)
    with torch.no_grad():
        with_lora = peft_model(input_ids=ids).logits
        reference = peft.PeftModel.from_pretrained(rounded, tmp_path).eval()
        torch.testing.assert_close(with_lora, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert relative_error(with_lora, logits) > 1e-3


def test_experts_with_their_own_forward_train_on_nf4_weights_read_again_in_backward(monkeypatch, tmp_path):
    """Llama 4's experts (one bmm over all experts, outside transformers' experts interface) run their own forward on
    NF4 weights read dequantized: only the 4-bit bytes are stored, the adapters' gradients are PEFT's on the rounded
    weights, and no full-precision weight lives from the forward to the backward: what the backward needs of one is
    dequantized again there. (JetMoE's and LongCat-Flash's experts read the same way: their (e) cells.)"""
    config = AutoConfig.for_model("llama4_text", vocab_size=64, hidden_size=64, intermediate_size=64,
                                  intermediate_size_mlp=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, num_local_experts=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    quantized = quantized_copy(model)
    rounded = dequantized_copy(model, quantized)
    assert all(p.dtype == torch.uint8 for m in experts_modules(quantized) for p in m.parameters(recurse=False))
    peft_model = random_lora_on(quantized).train()
    peft_model.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(rounded, tmp_path, is_trainable=True).train()
    reads = []
    read = expert_quant.adapted_weight
    monkeypatch.setattr(expert_quant, "adapted_weight",
                        lambda *args: reads.append(weakref.ref(weight := read(*args))) or weight)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = peft_model(input_ids=ids, labels=ids).loss
    assert len(reads) == 2 * 2  # one read per weight (2 layers x 2) and forward
    gc.collect()
    assert not [ref for ref in reads if ref() is not None]  # none kept for the backward
    loss.backward()
    assert len(reads) == 2 * 2 * 2  # the backward read each again
    reference(input_ids=ids, labels=ids).loss.backward()
    expected = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    got = {name: p.grad for name, p in peft_model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and sum(".experts." in name for name in got) == 2 * 2 * 2
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("double_quant, most_bits", [(True, 4.2), (False, 4.6)])
def test_expert_weights_take_about_four_bits(double_quant, most_bits):
    config = AutoConfig.for_model("mixtral", vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    model = AutoModelForCausalLM.from_config(config)
    expert_weights = sum(getattr(m, n).numel() for m in experts_modules(model) for n in moe.EXPERT_PARAMETERS)
    stored = sum(expert_quant.model_bytes(m) for m in experts_modules(quantized_copy(model, double_quant)))
    # 4 bits per weight, plus one scale per 64 weights (fp32, or 8-bit with one fp32 per 256 scales)
    assert 4.0 < 8 * stored / expert_weights < most_bits


@pytest.mark.conformance
def test_lora_on_nf4_experts_is_pefts_lora_on_the_rounded_weights(tmp_path, bnb_kernel_path):
    model, tokenizer, inputs = tiny_model_on_device()
    quantized = quantized_copy(model)
    rounded = dequantized_copy(model, quantized)
    with torch.no_grad():
        base_logits = quantized(**inputs).logits
    peft_model = random_lora_on(quantized)
    experts = peft_model.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts, expert_quant.QuantizedExpertsLora)
    peft_model.save_pretrained(tmp_path)
    with torch.no_grad():
        logits = peft_model(**inputs).logits
        # PEFT's own ParamWrapper on full-precision weights equal to the NF4 ones gives the same model: same layout
        reference = peft.PeftModel.from_pretrained(rounded, tmp_path).eval()
        assert type(reference.base_model.model.model.layers[0].mlp.experts) is peft.tuners.lora.layer.ParamWrapper
        assert relative_error(logits, reference(**inputs).logits) < SAME_RESULT
        assert not torch.allclose(logits, base_logits, atol=1e-3)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(**inputs).logits, base_logits)
    with pytest.raises(ValueError, match="moetune merge"):
        peft_model.merge_and_unload()


@pytest.mark.conformance
@pytest.mark.parametrize("bits", [4, 8])
def test_gradients_reach_only_adapters_and_match_with_activation_checkpointing(tmp_path, bits, bnb_kernel_path):
    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path / "base")
    recipe = parse_recipe({"run_dir": str(tmp_path / "run"), "model": {
        "name_or_path": str(tmp_path / "base"), "lora": {"targets": ["attention", "experts"]},
        "quantization": {"bits": bits}, "dtype": str(DTYPE).split(".")[-1]}}, "<test>")
    inputs = batch(tokenizer)
    gradients = []
    for checkpointing in (False, True):
        base = load_quantized(recipe.model_source, "base")  # on the GPU when there is one
        inputs = inputs.to(base.device)
        peft_model = random_lora_on(base).train()
        if checkpointing:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            peft_model.enable_input_require_grads()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = peft_model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        with_grad = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
        assert with_grad and all("lora_" in name for name in with_grad)
        assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == set(with_grad)
        assert sum("mlp.experts" in name for name in with_grad) == 2 * 2 * 2  # 2 layers x 2 parameters x (A, B)
        assert not any("mlp.gate" in name for name in with_grad)  # the router stays frozen
        # backward dequantizes experts again: autograd never keeps an expert matrix in full precision (as it is, or
        # transposed; compared by value, since an activation of 64 tokens x 64 features has a matrix's shape too)
        experts = [expert_quant.dequantize_expert(m, n, e) for m in experts_modules(base)
                   if expert_quant.is_quantized_experts(m) for n in moe.EXPERT_PARAMETERS for e in range(m.num_experts)]
        assert len(experts) == 2 * 2 * 4
        assert not [t for t in saved if t.is_floating_point() for w in experts
                    if t.shape in (w.shape, w.T.shape) and (torch.equal(t, w) or torch.equal(t, w.T))]
        gradients.append(with_grad)
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        assert relative_error(gradients[0][name], gradients[1][name]) < SAME_RESULT, name


# ---------------------------------------------------------------- guards for shapes a kernel path gets wrong

@pytest.mark.parametrize("hidden, intermediate", [(32, 32), (32, 48), (96, 64)])
def test_expert_rows_of_partial_blocks_are_padded_and_read_back_right(hidden, intermediate, bnb_kernel_path):
    model, tokenizer = tiny_model(hidden_size=hidden, intermediate_size=intermediate)
    quantized = quantized_copy(model)
    for full, nf4 in zip(experts_modules(model), experts_modules(quantized)):
        for name in moe.EXPERT_PARAMETERS:
            layout = nf4.nf4_layouts[name]
            assert layout.padded_in % expert_quant.BLOCKSIZE == 0 and layout.padded_in - layout.shape[1] < 64
            rounded = torch.stack([expert_quant.dequantize_expert(nf4, name, e) for e in range(nf4.num_experts)])
            error = relative_error(rounded, getattr(full, name))
            print(f"{bnb_kernel_path} {name} {tuple(layout.shape)}: relative error {error:.3f}")
            assert 0.02 < error < 0.12
    inputs = batch(tokenizer)
    with torch.no_grad():  # the padded forward is the full-precision forward on the rounded weights
        expected = dequantized_copy(model, quantized)(**inputs).logits
        assert torch.allclose(quantized(**inputs).logits, expected, atol=1e-5)


def test_round_trip_check_names_the_matrix_a_kernel_reads_back_wrong(monkeypatch):
    model, _ = tiny_model(hidden_size=32, intermediate_size=48)
    # Without the padding, the AVX-512 kernel's row-wise scales misread rows of half a block.
    monkeypatch.setattr(expert_quant, "padded_size", lambda in_features: in_features)
    registration = use_dequantize_kernel(row_blocked_dequantize_4bit)
    try:
        with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj\[0\] \(96, 32\) reads back "
                                             r"from NF4 with relative error 0\.[2-9]\d .*constraints\.txt"):
            quantized_copy(model)
    finally:
        registration._destroy()


def test_linears_of_partial_blocks_stay_full_precision_and_never_repack(tmp_path, bnb_kernel_path, capsys):
    model, tokenizer = tiny_model(hidden_size=32)  # attention in_features 32: below bitsandbytes' block of 64
    model.save_pretrained(tmp_path / "base")
    recipe = parse_recipe({"run_dir": str(tmp_path / "run"), "model": {
        "name_or_path": str(tmp_path / "base"), "lora": {"targets": ["attention", "experts"]},
        "quantization": {"bits": 4}}}, "<test>")
    # the fixture really switches bitsandbytes' choice of the repacking (AVX512-BF16) path
    assert bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu == (bnb_kernel_path == "avx512bf16")
    quantized = load_quantized(recipe.model_source, "base")
    assert "[quantization] 8 Linear layers with in_features [32] (not a multiple of bitsandbytes' 64-weight block) " \
           "stay in full precision, e.g. model.layers.0.self_attn.q_proj." in capsys.readouterr().out
    attention = quantized.model.layers[0].self_attn
    assert type(attention.q_proj) is nn.Linear and type(attention.o_proj) is nn.Linear
    inputs = batch(tokenizer)
    with torch.no_grad():
        assert relative_error(quantized(**inputs).logits, model(**inputs).logits) < 0.1
    # an eval pass without gradients (TRL's reference pass), then training: no repacked weight, gradients flow
    peft_model = random_lora_on(quantized)
    with torch.no_grad():
        peft_model(**inputs)
    peft_model.train()(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)
    linears = [m for m in load_quantized(recipe.model_source, "base").modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert not linears  # every Linear here is below the block; a 64-wide model quantizes them (next test)


def test_four_bit_linears_train_after_an_eval_pass_on_every_path(tmp_path, bnb_kernel_path):
    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path / "base")
    recipe = parse_recipe({"run_dir": str(tmp_path / "run"), "model": {
        "name_or_path": str(tmp_path / "base"), "lora": {"targets": ["attention", "experts"]},
        "quantization": {"bits": 4}}}, "<test>")
    peft_model = random_lora_on(load_quantized(recipe.model_source, "base"))
    linears = [m for m in peft_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 4  # q, k, v, o of both layers
    inputs = batch(tokenizer)
    with torch.no_grad():
        peft_model(**inputs)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linears)
    peft_model.train()(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def test_quantization_needs_lora_and_four_or_eight_bits(tmp_path):
    raw = {"run_dir": "r", "model": {"init": {}, "quantization": {"bits": 4}}}
    with pytest.raises(RecipeError, match="model.quantization needs model.lora"):
        parse_recipe(raw, "r.yaml")
    raw["model"].update(lora={}, quantization={"bits": 3})
    with pytest.raises(RecipeError, match="bits is 3; choose 4 or 8"):
        parse_recipe(raw, "r.yaml")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, bnb_kernel_path):
    tmp_path = tmp_path_factory.mktemp(f"qlora-{bnb_kernel_path}")
    recipe = write_recipe(tmp_path)
    assert main(["run", str(recipe), "--stages", "prep,sft,dpo", *QLORA]) == 0
    return load_recipe(recipe, QLORA), tmp_path / "run"


@pytest.mark.slow
def test_sft_then_dpo_train_adapters_on_the_quantized_base(qlora_run):
    _, run = qlora_run
    for stage in ("sft", "dpo"):
        assert (run / stage / "adapter_model.safetensors").is_file()
        assert logged(run / stage)[-1] < logged(run / stage)[0]
    manifest = json.loads((run / "dpo" / "moetune_stage.json").read_text())
    # DPO continued the SFT adapter (never merged into the 4-bit base): its adapter sits on the base directly
    assert manifest["outputs"]["parent"] == "base"
    assert not (run / "dpo" / "ref").exists()  # TRL's frozen reference copy is not part of the output
    # The reference is the SFT adapter: at the first step policy and reference agree (up to TRL's bf16 cast of the
    # trained copy), where the base (adapter disabled) would differ by the whole SFT update.
    first = next(entry for entry in json.loads((run / "dpo" / "metrics.json").read_text()) if "loss" in entry)
    assert abs(first["rewards/chosen"]) < 0.01 and abs(first["rewards/rejected"]) < 0.01


@pytest.mark.slow
def test_adapter_trained_on_nf4_loads_on_the_full_precision_base_and_merges(qlora_run, tmp_path):
    recipe, run = qlora_run
    tokenizer = AutoTokenizer.from_pretrained(run / "base")
    inputs = batch(tokenizer)
    with torch.no_grad():
        base = load_quantized(recipe.model_source, "base")
        quantized = expert_quant.load_adapter(base, str(run / "dpo"), trainable=False)
        quantized_logits = quantized.eval()(**inputs).logits
        full = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), run / "dpo").eval()
        full_logits = full(**inputs).logits
        with full.disable_adapter():
            base_logits = full(**inputs).logits
        # NF4 rounding of the base moves the logits far less than the trained adapter does
        assert (quantized_logits - full_logits).abs().max() < 0.5 * (full_logits - base_logits).abs().max()
        assert torch.allclose(load_stage_model(recipe.model_source, "dpo")(**inputs).logits, full_logits, atol=1e-4)
    assert main(["merge", str(run / "dpo"), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(**inputs).logits
    assert torch.allclose(merged_logits, full_logits, atol=1e-4)


OWN_FORWARD = ["llama4_text", "jetmoe", "longcat_flash", "nemotron_h"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MOETUNE_ALL_FAMILIES") != "1",
                    reason="a few minutes per family: runs with MOETUNE_ALL_FAMILIES=1 (the conformance run)")
@pytest.mark.parametrize("family", OWN_FORWARD)
def test_qlora_sft_then_dpo_through_the_cli_where_experts_run_their_own_forward(family, tmp_path):
    """`moetune run` (a subprocess, as a user runs it) of a QLoRA recipe, `model.quantization: {bits: 4}`, LoRA SFT
    then LoRA DPO with the default roles on a 4-layer model.init: Llama 4's experts run their own forward on NF4
    weights read dequantized (JetMoE's, LongCat-Flash's too; Nemotron-H's non-gated ones run the NF4 forward). The
    suite has the mechanism's in-process test above and Mixtral's QLoRA chain. SFT activation checkpointing off (the
    backward dequantizes again), DPO on (JetMoE cannot be checkpointed)."""
    recipe = write_lora_chain_recipe(tmp_path, family, model={"quantization": {"bits": 4}},
                                     sft={"max_steps": 4, "activation_checkpointing": False},
                                     dpo={"max_steps": 2, "activation_checkpointing": family != "jetmoe"})
    done = subprocess.run([sys.executable, "-m", "finetune", "run", str(recipe), "--stages", "prep,sft,dpo"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert logged(run / "sft")[-1] < logged(run / "sft")[0]
    assert json.loads((run / "dpo" / "moetune_stage.json").read_text())["outputs"]["parent"] == "base"
    for stage in ("sft", "dpo"):
        config = json.loads((run / stage / "adapter_config.json").read_text())
        modules = {target.rsplit(".", 1)[0] for target in config["target_parameters"]}
        assert any(m.endswith("experts") or "linear" in m for m in modules), modules  # the routed experts' weights
        tensors = load_file(str(run / stage / "adapter_model.safetensors"))
        expert_b = {k: v for k, v in tensors.items() if "lora_B" in k and any(f".{m}." in k for m in modules)}
        assert expert_b and all(v.abs().max() > 0 for v in expert_b.values()), stage  # B starts at zero: trained
