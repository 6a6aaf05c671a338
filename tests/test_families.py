"""The conformance matrix: every family of the registry (finetune/core/families.py) through the same checks.

Each check is one test parametrised over the families, on a tiny model of the family (hidden 64, 4 experts, top-2,
2 layers) built once per session. A check a family cannot pass yet is asserted to be refused by the code, with the
reason it gives, and reported as skipped with that reason. `python -m tests.helpers.conformance_matrix` runs this
file and prints the family x check table shown in docs/families.md.
"""

import copy
import re

import peft
import pytest
import torch
from datasets import Dataset
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from finetune.core import synthetic_task
from finetune.modeling import adapters, moe
from finetune.training import balancing, expert_load
from finetune.core import families
from finetune.modeling.tiny import init_config, train_tokenizer
from finetune.training.packed_dpo import PackedDPOTrainer
from finetune.training.packed_sft import PaddingFreeSFTTrainer
from finetune.config.recipe import BalancingConfig, LoraConfig, ModelInit
from helpers.nf4 import dequantized_copy, quantized_copy, random_lora_on
from helpers.parity import loss_and_gradients
from helpers.trainers import build, dpo_config, same_math, whole_dataset

FAMILIES = list(families.FAMILIES)
ROLES = ["attention", "experts", "shared_experts", "dense_mlp"]

# MoE model_types of transformers 5.24 that the registry does not cover; each is refused by name (see
# test_every_moe_model_type_is_covered_or_refused). A model_type added upstream is in neither list: that test fails
# and names it, so it gets an entry (and this matrix) or joins this list, instead of silently half-working.
REFUSED_MOE_TYPES = {
    "afmoe", "aria", "aria_text", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_ocr2",
    "deepseek_ocr2_text", "deepseek_v32", "deepseek_v4", "diffusion_gemma", "diffusion_gemma_text", "doge",
    "dots3_note", "dots3_note_text", "dots3_note_vision_encoder", "ernie4_5_vl_moe", "ernie4_5_vl_moe_text",
    "exaone_moe", "flint", "gemma4", "gemma4_text", "glm4_moe_lite", "glm4v_moe", "glm4v_moe_text", "glm5_next",
    "glm5_next_text", "glm_moe_dsa", "granitemoe_swa", "hy_v3", "hy_v4", "hy_v4_vl", "hy_v4_vl_text", "inkling2",
    "inkling2_loop", "inkling2_loop_text", "inkling2_text", "inkling_mm_model", "inkling_text", "jetmoe", "kimi_k25",
    "kimi_linear", "kolibri1", "laguna", "lara_mini", "lfm2_moe", "llama4", "longcat_flash", "mellum",
    "mimo_v2_flash", "minimax", "minimax_m3_vl", "minimax_m3_vl_text", "mistral4", "mistral_large4",
    "mistral_large4_text", "muse_spark", "muse_spark_text", "nemo_speechlm", "nemotron_h", "nemotron_h_omni",
    "nllb-moe", "openai_privacy_filter", "qwen3_omni_moe", "qwen3_omni_moe_talker_text", "qwen3_omni_moe_text",
    "qwen3_omni_moe_thinker", "qwen3_vl_moe", "qwen3_vl_moe_text", "qwen4_exp", "qwen4_exp_text", "sarvam_mla",
    "sarvam_moe", "solar_open", "step3p5", "step3p7", "switch_transformers", "unlimited_ocr", "unlimited_ocr_text",
    "vitpose_backbone", "zaya",
}


# ---------------------------------------------------------------- shared fixtures

@pytest.fixture(scope="session")
def data():
    """A tokenizer trained on synthetic conversations and pairs, with 8 of each."""
    pairs = list(synthetic_task.preference_pairs(8, 3))
    conversations = list(synthetic_task.sft_conversations(8, 4))
    texts = [m["content"] for row in pairs for key in ("prompt", "chosen", "rejected") for m in row[key]]
    texts += [m["content"] for row in conversations for m in row["messages"]]
    return train_tokenizer(texts, vocab_size=200), Dataset.from_list(pairs), Dataset.from_list(conversations)


@pytest.fixture(scope="session")
def models(data):
    """A cache of one tiny model per family, built on first use."""
    tokenizer = data[0]
    built = {}

    def model_of(architecture):
        if architecture not in built:
            init = ModelInit(architecture=architecture, hidden_size=64, intermediate_size=128, num_layers=2,
                             num_heads=4, num_kv_heads=2, num_experts=4, experts_per_token=2,
                             router_aux_loss_coef=0.05)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(init_config(init, tokenizer))
            families.prepare_for_training(model)
            built[architecture] = model
        return copy.deepcopy(built[architecture])

    return model_of


def padded_batch(tokenizer, rows=3):
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False)
             for row in synthetic_task.sft_conversations(rows, 1)]
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True)


def refused(action, reason: str):
    """Assert the code refuses `action` with the registry's reason, then report the check as refused."""
    with pytest.raises(ValueError, match=re.escape(reason)):
        action()
    pytest.skip(f"refused: {reason}")


# ---------------------------------------------------------------- the registry and transformers' MoE types

def moe_model_types() -> set[str]:
    """Every model_type of the installed transformers whose default config declares a routed-expert count."""
    found = set()
    for model_type, config_class in CONFIG_MAPPING.items():
        try:
            config = config_class()
        except Exception:  # composite configs that need arguments; their text configs are listed on their own
            continue
        if families.declares_experts(config):
            found.add(model_type)
    return found


def test_every_moe_model_type_is_covered_or_refused():
    moe_types = moe_model_types()
    covered = set(FAMILIES) | set(families.ALIASES)
    untested = moe_types - covered - REFUSED_MOE_TYPES
    assert not untested, (f"MoE model_types of the installed transformers that the conformance matrix does not "
                          f"cover: {sorted(untested)}. Add a families.py entry, or list them in REFUSED_MOE_TYPES.")
    assert set(FAMILIES) - {"qwen3_5_moe_text"} <= moe_types  # the registry's own names are real MoE types
    for model_type in sorted(REFUSED_MOE_TYPES & moe_types)[:: 7]:  # a sample: building configs is slow
        with pytest.raises(families.UnsupportedFamily, match=f"model_type '{model_type}'"):
            families.check_supported(CONFIG_MAPPING[model_type]())


def test_an_unsupported_family_is_refused_by_name_before_its_weights_load(tmp_path):
    from finetune.modeling.loading import load_pretrained
    from finetune.config.parsing import parse_recipe

    CONFIG_MAPPING["cohere2_moe"]().save_pretrained(tmp_path)  # a config, no weights: loading them would fail
    recipe = parse_recipe({"run_dir": str(tmp_path / "run"), "model": {"name_or_path": str(tmp_path)}}, "r.yaml")
    with pytest.raises(families.UnsupportedFamily, match="model_type 'cohere2_moe' is a Mixture-of-Experts family"):
        load_pretrained(recipe.model_source, str(tmp_path))


def test_model_init_accepts_every_family():
    from finetune.config.parsing import parse_recipe

    for architecture in FAMILIES + list(families.ALIASES):
        recipe = parse_recipe({"run_dir": "out", "model": {"init": {"architecture": architecture}}}, "r.yaml")
        assert recipe.model.init.architecture == architecture


# ---------------------------------------------------------------- (a) roles

@pytest.mark.parametrize("family", FAMILIES)
def test_a_roles_found_only_adapters_train_router_frozen(models, data, family):
    entry = families.FAMILIES[family]
    model = models(family)
    assert moe.routers(model) and adapters.expert_parameter_targets(model) and adapters.attention_linear_targets(model)
    assert bool(adapters.shared_expert_targets(model)) == bool(entry.shared_experts)
    frozen = {name: tensor.detach().clone() for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    shared_and_dense = adapters.shared_expert_targets(model) + adapters.dense_mlp_targets(model)
    peft_model = peft.get_peft_model(model, adapters.peft_config(model, LoraConfig(targets=ROLES)))
    trainable = adapters.trainable_parameter_names(peft_model)
    assert trainable and all("lora_" in name for name in trainable)
    assert all(any(f"{target}.lora_A" in name for name in trainable) for target in shared_and_dense)

    peft_model.train()
    inputs = padded_batch(data[0])
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    with_grad = [n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any("experts" in name for name in with_grad) and all("lora_" in name for name in with_grad)
    optimizer.step()
    base = peft_model.get_base_model()
    for name, tensor in [*base.named_parameters(), *base.named_buffers()]:
        if "lora_" not in name and name.replace(".base_layer", "") in frozen:
            assert torch.equal(tensor, frozen[name.replace(".base_layer", "")]), name  # router, bias, base weights


# ---------------------------------------------------------------- (b) expert load

@pytest.mark.parametrize("family", FAMILIES)
def test_b_expert_load_counts_real_tokens_times_top_k(models, data, family):
    model = models(family)
    inputs = padded_batch(data[0])
    real = int(inputs["attention_mask"].sum())
    assert real < inputs["attention_mask"].numel()  # the batch has padding
    tracker = expert_load.ExpertLoadTracker(model)
    model(**inputs)
    _, top_k = moe.routing_sizes(model)
    assert [int(counts.sum()) for counts in tracker.counts.values()] == [real * top_k] * len(tracker.counts)
    with torch.no_grad():  # forwards without gradients (reference, evaluation) do not count
        model(**inputs)
    assert [int(counts.sum()) for counts in tracker.counts.values()] == [real * top_k] * len(tracker.counts)
    tracker.remove()


# ---------------------------------------------------------------- (c) balancing

@pytest.mark.parametrize("family", FAMILIES)
def test_c_balancing_term_present_and_logged(models, data, family, tmp_path):
    entry = families.FAMILIES[family]
    model = models(family)
    tokenizer, _, conversations = data
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=40,
                     per_device_train_batch_size=4, max_steps=1, logging_steps=1, save_strategy="no", seed=0,
                     learning_rate=1e-3)
    trainer = SFTTrainer(model=model, args=args, train_dataset=conversations, processing_class=tokenizer,
                         peft_config=adapters.peft_config(model, LoraConfig()))
    biases = {name: bias.clone() for name, bias in moe.bias_tensors(model).items()}
    balancing.attach(trainer, model, BalancingConfig(router_z_loss_coef=1e-3,
                                                     bias_update_rate=1e-3 if entry.has_bias else 0.0))
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["router_z_loss"] > 0
    assert trainer.aux_loss_enabled == entry.has_aux_loss
    assert ("aux_loss" in logged) == entry.has_aux_loss
    assert bool(biases) == entry.has_bias
    for name, bias in moe.bias_tensors(model).items():  # moved by the update rule, by the rate at most
        assert 0 < (bias - biases[name]).abs().max() <= 1e-3 + 1e-7


# ---------------------------------------------------------------- (d) packed batches equal TRL's

@pytest.mark.parametrize("family", FAMILIES)
def test_d_packed_sft_and_prompt_shared_dpo_equal_trl(models, data, family, tmp_path):
    entry = families.FAMILIES[family]
    tokenizer, pairs, conversations = data
    if entry.padding_free:
        refused(lambda: PackedDPOTrainer(**dpo_arguments(models(family), tokenizer, pairs, tmp_path)),
                entry.padding_free)
    trainers = []
    for trainer_class in (SFTTrainer, PaddingFreeSFTTrainer):
        config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=30,
                           per_device_train_batch_size=8, assistant_only_loss=True, seed=0)
        trainers.append(trainer_class(model=model_for_comparison(models, entry), args=config, train_dataset=conversations,
                                      processing_class=tokenizer))
    same_math(loss_and_gradients(trainers[0], whole_dataset(trainers[0])), trainers[1])

    tiny = (model_for_comparison(models, entry), tokenizer, pairs)
    trl = build(tiny, tmp_path / "trl")
    same_math(loss_and_gradients(trl, whole_dataset(trl)),
              build(tiny, tmp_path / "packed", PackedDPOTrainer, trainer_options={"share_prompt": True}))


def model_for_comparison(models, entry):
    """The family's model; where its router samples experts in training, routing as in evaluation (deterministic),
    so that two layouts of one batch can be compared."""
    model = models(entry.model_type)
    if entry.samples_experts_in_training:
        for router in moe.routers(model).values():
            router.register_forward_pre_hook(lambda module, args: setattr(module, "training", False))
    return model


def dpo_arguments(model, tokenizer, pairs, tmp_path) -> dict:

    return dict(model=model, args=dpo_config(tmp_path), train_dataset=pairs, processing_class=tokenizer,
                peft_config=adapters.peft_config(model, LoraConfig()))


# ---------------------------------------------------------------- (e) NF4 experts

@pytest.mark.parametrize("family", FAMILIES)
def test_e_nf4_expert_lora_equals_peft_on_rounded_weights(models, data, family, tmp_path):
    entry = families.FAMILIES[family]
    model = models(family)
    if entry.nf4_experts:
        refused(lambda: quantized_copy(model), entry.nf4_experts)
    quantized = quantized_copy(model)
    rounded = dequantized_copy(model, quantized)
    inputs = padded_batch(data[0])
    peft_model = random_lora_on(quantized, targets=LoraConfig().targets)
    peft_model.save_pretrained(tmp_path)
    with torch.no_grad():
        logits = peft_model(**inputs).logits
        reference = peft.PeftModel.from_pretrained(rounded, tmp_path).eval()
        torch.testing.assert_close(logits, reference(**inputs).logits, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- (f) save, load, merge

@pytest.mark.parametrize("family", FAMILIES)
def test_f_save_load_merge_round_trip_gives_identical_logits(models, data, family, tmp_path):
    model = models(family)
    model.save_pretrained(tmp_path / "base")
    inputs = padded_batch(data[0])
    with torch.no_grad():
        base_logits = model(**inputs).logits
    trained = random_lora_on(model, targets=ROLES)
    trained.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = trained(**inputs).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=1e-5)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(base_logits, expected, atol=1e-3)  # the adapter changes the model


# ---------------------------------------------------------------- (g) distributed wrap classes

@pytest.mark.parametrize("family", FAMILIES)
def test_g_zero3_leaf_and_fsdp2_wrap_classes_found(models, family):
    model = models(family)
    leaves = moe.moe_block_classes(model)
    assert len(leaves) == 1
    assert all(type(model.get_submodule(name.rsplit(".", 1)[0])) is leaves[0] for name in moe.routers(model))
    layers = moe.decoder_layer_classes(model)
    assert layers and {cls.__name__ for cls in layers} <= set(model._no_split_modules)


# ---------------------------------------------------------------- (h) the router role

@pytest.mark.parametrize("family", FAMILIES)
def test_h_router_role_wraps_the_router_and_tracking_reads_through_it(models, data, family, tmp_path):
    """`model.lora.targets: [..., router]`: PEFT wraps the router weight; routers, routing sizes and the expert-load
    tracker find the router through the wrapper (they crashed on `ParamWrapper.top_k`, #27); the adapter saves,
    reloads with identical logits and merges."""
    model = models(family)
    model.save_pretrained(tmp_path / "base")
    names, sizes = list(moe.routers(model)), moe.routing_sizes(model)
    trained = random_lora_on(model, targets=("attention", "experts", "router"))
    trainable = adapters.trainable_parameter_names(trained)
    assert all(any(name.startswith(f"base_model.model.{router}.") and ".lora_" in name for name in trainable)
               for router in names)

    assert [name.removeprefix("base_model.model.") for name in moe.routers(trained)] == names
    assert moe.routing_sizes(trained) == sizes
    inputs = padded_batch(data[0])
    tracker = expert_load.ExpertLoadTracker(trained)
    trained(**inputs)
    real = int(inputs["attention_mask"].sum())
    assert [int(counts.sum()) for counts in tracker.counts.values()] == [real * sizes[1]] * len(names)
    tracker.remove()

    trained.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = trained(**inputs).logits
        loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                                tmp_path / "adapter").eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=1e-5)
        merged = adapters.merge_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
        torch.testing.assert_close(merged.eval()(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
        router = next(iter(moe.routers(merged).values()))
        base_router = next(iter(moe.routers(AutoModelForCausalLM.from_pretrained(tmp_path / "base")).values()))
        weight = families.FAMILIES[family].router_weight
        assert not torch.equal(router.get_parameter(weight), base_router.get_parameter(weight))  # merged into
