"""The conformance matrix: every family of the registry (finetune/core/families.py) through the same checks.

Each check is one test parametrised over the families, on a tiny model of the family (hidden 64, 4 experts, top-2,
2 layers) built once per session. A check a family cannot pass yet is asserted to be refused by the code, with the
reason it gives, and reported as skipped with that reason. `python -m tests.helpers.conformance_matrix` runs this
file and prints the family x check table shown in docs/families.md.
"""


import functools

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from finetune.core import families
from finetune.modeling import adapters, memory_plan, moe
from finetune.config.parsing import parse_recipe
from finetune.config.recipe import BalancingConfig, LoraConfig
from finetune.training import balancing, expert_load
from finetune.training.packed_dpo import PackedDPOTrainer
from finetune.training.packed_forward import padding_free_refusal
from finetune.training.packed_sft import PaddingFreeSFTTrainer
from finetune.training.scored_lm_head import head_logit_scale, scored_log_probs
from helpers.family_models import FAMILIES, ROLES, base_under_adapter, data, load_as_cli, models, padded_batch, refused  # noqa: F401 (fixtures)
from helpers.nf4 import dequantized_copy, quantized_copy, random_lora_on
from helpers.parity import loss_and_gradients
from helpers.trainers import build, dpo_config, same_math, whole_dataset



# ---------------------------------------------------------------- the registry and transformers' MoE types

def test_model_init_accepts_every_family():
    for architecture in FAMILIES + list(families.ALIASES):
        recipe = parse_recipe({"run_dir": "out", "model": {"init": {"architecture": architecture}}}, "r.yaml")
        assert recipe.model.init.architecture == architecture


# ---------------------------------------------------------------- (a) roles

@pytest.mark.parametrize("family", FAMILIES)
def test_a_roles_found_only_adapters_train_router_frozen(models, data, family):
    model = models(family)
    entry = families.family_of(model)
    assert moe.routers(model) and adapters.expert_parameter_targets(model) and adapters.attention_linear_targets(model)
    if entry.shared_experts is not None:  # a registry entry names them; else found by structure
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
    zero_computation = zero_computation_picks(model, inputs)
    tracker = expert_load.ExpertLoadTracker(model)
    model(**inputs)
    _, top_k = moe.routing_sizes(model)
    expected = [real * top_k - zero_computation[name] for name in tracker.counts]
    assert [int(counts.sum()) for counts in tracker.counts.values()] == expected
    with torch.no_grad():  # forwards without gradients (reference, evaluation) do not count
        model(**inputs)
    assert [int(counts.sum()) for counts in tracker.counts.values()] == expected
    tracker.remove()


def zero_computation_picks(model, inputs) -> dict[str, int]:
    """Per router, how many of the real tokens' top-k picks go to experts past the routed ones (LongCat-Flash's
    zero-computation experts: no expert runs for them, so no load is counted); 0 elsewhere. Read from the routers'
    outputs in a forward of its own (routing does not depend on gradients)."""
    family, sizes = families.family_of(model), moe.routing_sizes(model)
    real = inputs["attention_mask"].flatten().bool()
    picks = dict.fromkeys(moe.routers(model), 0)

    def count(name, module, args, output):
        indices = moe.top_k_indices(family, output, module, sizes).reshape(-1, sizes[1])[real]
        picks[name] += int((indices >= moe.num_experts(model, name, module)).sum())

    handles = [router.register_forward_hook(functools.partial(count, name))
               for name, router in moe.routers(model).items()]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return picks


# ---------------------------------------------------------------- (c) balancing

@pytest.mark.parametrize("family", FAMILIES)
def test_c_balancing_term_present_and_logged(models, data, family, tmp_path):
    model = models(family)
    entry = families.family_of(model)
    tokenizer, _, conversations = data
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=40,
                     per_device_train_batch_size=4, max_steps=1, logging_steps=1, save_strategy="no", seed=0,
                     learning_rate=1e-3, activation_checkpointing=model.supports_gradient_checkpointing)
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
    entry = families.family_of(models(family))
    tokenizer, pairs, conversations = data
    reason = padding_free_refusal(models(family))
    if reason:
        refused(lambda: PackedDPOTrainer(**dpo_arguments(models(family), tokenizer, pairs, tmp_path)), reason)
    trainers = []
    for trainer_class in (SFTTrainer, PaddingFreeSFTTrainer):
        config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=30,
                           per_device_train_batch_size=8, assistant_only_loss=True, seed=0)
        trainers.append(trainer_class(model=model_for_comparison(models, entry, family), args=config, train_dataset=conversations,
                                      processing_class=tokenizer))
    same_math(loss_and_gradients(trainers[0], whole_dataset(trainers[0])), trainers[1])

    tiny = (model_for_comparison(models, entry, family), tokenizer, pairs)
    trl = build(tiny, tmp_path / "trl")
    same_math(loss_and_gradients(trl, whole_dataset(trl)),
              build(tiny, tmp_path / "packed", PackedDPOTrainer, trainer_options={"share_prompt": True}))


def test_packed_log_probs_carry_the_heads_logit_scale(models):
    """Cohere's head multiplies its logits by `logit_scale` (1/16): the packed forward's log-probs did not, and its
    DPO gradients were 16 times TRL's (cohere2_moe's (d) cell). They are the log-softmax of the scaled logits."""
    model = models("cohere2_moe")
    scale = head_logit_scale(model.config)
    assert scale == model.config.get_text_config().logit_scale != 1.0
    hidden, targets = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(0)), \
        torch.arange(6)
    log_probs = scored_log_probs(model, hidden, targets, ("log_probs",), logit_scale=scale)[0]
    with torch.no_grad():
        expected = torch.log_softmax(model.get_output_embeddings()(hidden) * scale, -1)[torch.arange(6), targets]
    torch.testing.assert_close(log_probs.detach(), expected)


def model_for_comparison(models, entry, family):
    """The family's model; where its router samples experts in training, routing as in evaluation (deterministic),
    so that two layouts of one batch can be compared."""
    model = models(family)
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
    model = models(family)
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
        base = base_under_adapter(tmp_path / "base", tmp_path / "adapter")
        loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=1e-5)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(base_logits, expected, atol=1e-3)  # the adapter changes the model


# ---------------------------------------------------------------- (g) distributed wrap classes

@pytest.mark.parametrize("family", FAMILIES)
def test_g_zero3_leaf_and_fsdp2_wrap_classes_found(models, family):
    model = models(family)
    leaves = moe.moe_block_classes(model)  # one class; two where attention routes too (JetMoE's MoA and MoE)
    blocks = moe.moe_blocks(model)
    assert 1 <= len(leaves) <= 2 and {type(block) for block in blocks.values()} == set(leaves)
    assert all(any(router.startswith(block + ".") for block in blocks) for router in moe.routers(model))
    layers = moe.decoder_layer_classes(model)
    assert layers and {cls.__name__ for cls in layers} <= set(model._no_split_modules)


# ---------------------------------------------------------------- (j) the router role

@pytest.mark.parametrize("family", FAMILIES)
def test_j_router_role_wraps_the_router_and_tracking_reads_through_it(models, data, family, tmp_path):
    """`model.lora.targets: [..., router]`: PEFT wraps the router weight; routers, routing sizes and the expert-load
    tracker find the router through the wrapper (they crashed on `ParamWrapper.top_k`, #27); the router's adapter
    gets gradients (also where the router reads its weight itself: LongCat-Flash), saves, reloads (as the CLI loads
    a model) with identical logits and merges. A family whose router has no (experts, hidden) weight is refused
    with the reason."""
    model = models(family)
    reason = adapters.router_role_refusal(model)
    if reason:
        refused(lambda: adapters.peft_config(model, LoraConfig(targets=["attention", "router"])), reason)
    model.save_pretrained(tmp_path / "base")
    names, sizes = list(moe.routers(model)), moe.routing_sizes(model)
    trained = random_lora_on(model, targets=("attention", "experts", "router"))
    trainable = adapters.trainable_parameter_names(trained)
    assert all(any(name.startswith(f"base_model.model.{router}.") and ".lora_" in name for name in trainable)
               for router in names)

    assert [name.removeprefix("base_model.model.") for name in moe.routers(trained)] == names
    assert moe.routing_sizes(trained) == sizes
    inputs = padded_batch(data[0])
    zero_computation = zero_computation_picks(trained, inputs)  # through the wrapped routers, as (b) counts them
    tracker = expert_load.ExpertLoadTracker(trained)
    trained(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(any(name.startswith(f"base_model.model.{router}.") and ".lora_" in name and param.grad is not None
                   and param.grad.abs().sum() > 0 for name, param in trained.named_parameters()) for router in names)
    real = int(inputs["attention_mask"].sum())
    assert [int(counts.sum()) for counts in tracker.counts.values()] == [real * sizes[1] - zero_computation[name]
                                                                         for name in tracker.counts]
    tracker.remove()

    trained.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = trained(**inputs).logits
        loaded = peft.PeftModel.from_pretrained(load_as_cli(tmp_path / "base"),
                                                tmp_path / "adapter").eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=1e-5)
        merged = adapters.merge_adapter(load_as_cli(tmp_path / "base"), tmp_path / "adapter")
        torch.testing.assert_close(merged.eval()(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
        router_name, router = next(iter(moe.routers(merged).items()))
        base_router = next(iter(moe.routers(load_as_cli(tmp_path / "base")).values()))
        weight = moe.router_weight_name(merged, router_name)
        assert not torch.equal(router.get_parameter(weight), base_router.get_parameter(weight))  # merged into


def test_a_router_reading_its_weight_itself_trains_its_lora_once_its_reads_are_routed(models, data):
    """LongCat-Flash's router computes F.linear(x, self.classifier.weight): PEFT applies the LoRA of classifier.weight
    only inside the classifier's own forward, which never runs. A model built outside moetune's loaders is refused
    with that reason; moetune's loaders (the `models` fixture loads as the CLI does) route the router's reads through
    the LoRA: its adapter gets gradients, and a disabled adapter leaves the model as it was. (The suite's sample of
    (j); with MOETUNE_ALL_FAMILIES=1 the (j) cell runs LongCat-Flash whole.)"""
    model = models("longcat_flash")
    with pytest.raises(ValueError, match="reads classifier.weight itself"):
        adapters.peft_config(AutoModelForCausalLM.from_config(model.config), LoraConfig(targets=["attention", "router"]))
    peft_model = random_lora_on(model, targets=("attention", "router"))
    inputs = padded_batch(data[0])
    with peft_model.disable_adapter(), torch.no_grad():
        plain = peft_model(**inputs).logits
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    router_lora = [p for n, p in peft_model.named_parameters() if ".router.classifier.lora_" in n]
    assert router_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in router_lora)
    with peft_model.disable_adapter(), torch.no_grad():
        assert torch.equal(peft_model(**inputs).logits, plain)  # the hooks honour a disabled adapter


# ---------------------------------------------------------------- adapters whose keys a checkpoint renaming would move

@pytest.mark.parametrize("family", ["laguna", "inkling2_text"])
def test_an_adapter_reloads_whole_where_the_checkpoint_renamings_would_move_its_keys(models, data, family, tmp_path):
    """PEFT renames a loaded adapter's keys through the family's checkpoint conversion; Laguna's unescaped
    `mlp.shared_expert.` and Inkling 2's `sconv.weight_proj` renamings sent the shared experts' and the dynamic
    convolutions' LoRA to no module (left at zero, logits off by 0.7). Every key loads, the logits are the trained
    ones."""
    model = models(family)
    model.save_pretrained(tmp_path / "base")
    trained = random_lora_on(model, targets=ROLES)
    trained.save_pretrained(tmp_path / "adapter")
    inputs = padded_batch(data[0])
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter").eval()
    expected = {name: p for name, p in trained.named_parameters() if "lora_" in name}
    assert {name: p for name, p in loaded.named_parameters() if "lora_" in name}.keys() == expected.keys()
    assert all(torch.equal(p, expected[name]) for name, p in loaded.named_parameters() if "lora_" in name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, trained(**inputs).logits, rtol=0, atol=1e-5)


def test_routers_found_on_the_peft_model_are_the_base_models(models):
    """With LoRA r equal to the expert count, a lora_A (r rows) looked like a router: on Gemma 4 (router beside the
    MLP in the layer, attention adapted before it) the expert-load and routing-drift hooks went on the attention."""
    model = models("gemma4_text")
    names = list(moe.routers(model))
    peft_model = peft.get_peft_model(model, adapters.peft_config(model, LoraConfig(r=moe.routing_sizes(model)[0])))
    assert [name.removeprefix("base_model.model.") for name in moe.routers(peft_model)] == names


@pytest.mark.parametrize("family", ["jetmoe", "nemotron_h"])
def test_memory_plan_counts_experts_without_gate_up_proj(models, family):
    """The plan read every experts module's down_proj and gate_up_proj: Nemotron-H's (up_proj, down_proj) and
    JetMoE's (one weight per projection module) stopped `moetune run` before its first stage. Under QLoRA it counts
    the experts a family reads dequantized whole."""
    census = memory_plan.census(models(family))
    assert census.expert_lora_elements > 0 and all(elements > 0 for elements in census.layer_elements)
    # QLoRA: JetMoE's experts run their own forward on weights read dequantized, a layer's at once (Nemotron-H's
    # non-gated ones run the NF4 forward, a matrix at a time)
    assert census.experts_read_whole == (family == "jetmoe")
    qlora = memory_plan.Setup(stage="sft", weight_bytes=2, lora_roles=frozenset({"experts"}), quant_bits=4)
    read_whole = memory_plan.footprint(census, qlora).activations - memory_plan.activation_bytes(census, qlora)
    assert read_whole == (2 * max(census.layer_expert_weights) if family == "jetmoe" else 0)
