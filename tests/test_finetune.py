"""MoE-aware adapters, router/aux-loss handling, expert-load tracking and adapter round trips on tiny models."""

import peft
import pytest
import torch

from transformers import AutoConfig, AutoModelForCausalLM

from finetune.modeling import adapters
from finetune.training import expert_load
from finetune.modeling.loading import experts_kernel
from finetune.config.recipe import LoraConfig, ModelConfig
from helpers.tiny import ARCHITECTURES, batch, tiny_model


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_lora_roles_adapt_attention_and_experts_and_keep_router_frozen(architecture):
    model, tokenizer = tiny_model(architecture)
    router_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    peft_model = peft.get_peft_model(model, adapters.peft_config(model, LoraConfig(targets=["attention", "experts"])))
    trainable = adapters.trainable_parameter_names(peft_model)
    assert trainable and all("lora_" in name for name in trainable)
    assert any("self_attn.q_proj.lora_A" in name for name in trainable)
    assert any("mlp.experts" in name for name in trainable)
    assert not any("mlp.gate" in name for name in trainable)

    # one optimizer step: gradients reach only adapters, the router and base weights do not move
    peft_model.train()
    inputs = batch(tokenizer)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    with_grad = [n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert with_grad and all("lora_" in name for name in with_grad)
    assert any("experts" in name for name in with_grad)
    optimizer.step()
    for name, param in peft_model.named_parameters():
        short = name.split("base_model.model.", 1)[-1]
        if short in router_before:
            assert torch.equal(param, router_before[short])


def test_router_is_trained_only_when_listed():
    model, _ = tiny_model()
    peft_model = peft.get_peft_model(model, adapters.peft_config(model, LoraConfig(targets=["all"])))
    assert any("mlp.gate" in name for name in adapters.trainable_parameter_names(peft_model))


def test_dropout_is_forced_to_zero_on_expert_targets():
    model, _ = tiny_model()
    with pytest.warns(UserWarning, match="dropout"):
        config = adapters.peft_config(model, LoraConfig(targets=["experts"], dropout=0.1))
    assert config.lora_dropout == 0.0
    assert adapters.peft_config(model, LoraConfig(targets=["attention"], dropout=0.1)).lora_dropout == 0.1


def test_aux_loss_is_part_of_the_loss_when_router_logits_are_on():
    model, tokenizer = tiny_model()
    inputs = batch(tokenizer)
    out = model(**inputs, labels=inputs["input_ids"], output_router_logits=True)
    plain = model(**inputs, labels=inputs["input_ids"], output_router_logits=False)
    coef = model.config.router_aux_loss_coef
    assert coef == pytest.approx(0.01) and out.aux_loss > 0
    assert out.loss.item() == pytest.approx(plain.loss.item() + coef * out.aux_loss.item(), rel=1e-5)


def test_expert_load_counts_every_real_token_once_per_chosen_expert():
    model, tokenizer = tiny_model()
    inputs = batch(tokenizer)
    tracker = expert_load.ExpertLoadTracker(model)
    model(**inputs)
    real_tokens = int(inputs["attention_mask"].sum())
    assert real_tokens < inputs["attention_mask"].numel()  # the batch has padding, which must not count
    counts = {name: int(c.sum()) for name, c in tracker.counts.items()}
    assert len(counts) == 2 and all(total == real_tokens * 2 for total in counts.values())
    shares = tracker.take()
    assert all(abs(sum(s) - 1) < 1e-4 for s in shares.values())
    with torch.no_grad():  # reference/eval forwards are not training load
        model(**inputs)
    assert all(int(c.sum()) == 0 for c in tracker.counts.values())
    tracker.remove()


def test_experts_kernel_auto_is_transformers_choice_and_named_kernels_are_checked(recwarn):
    """auto passes nothing: transformers takes grouped_mm where the family's experts can switch kernels (Mixtral)
    and the family's own forward where they cannot (Llama 4, which refuses any kernel argument)."""
    mixtral = AutoConfig.for_model("mixtral")
    assert experts_kernel(ModelConfig(name_or_path="x"), mixtral) == {} and not recwarn
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mixtral", hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, vocab_size=64))
    assert model.config._experts_implementation == "grouped_mm"
    with pytest.raises(ValueError, match="model.experts_implementation=eager: Llama4ForCausalLM .* set "
                                         "model.experts_implementation to auto"):
        experts_kernel(ModelConfig(name_or_path="x", experts_implementation="eager"), AutoConfig.for_model("llama4_text"))
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="batched_mm runs 30-40x slower"):
            named = experts_kernel(ModelConfig(name_or_path="x", experts_implementation="batched_mm"), mixtral)
            assert named == {"experts_implementation": "batched_mm"}


def test_coefficient_of_variation():
    assert expert_load.coefficient_of_variation([0.25] * 4) == 0
    assert expert_load.coefficient_of_variation([1, 0, 0, 0]) == pytest.approx(3 ** 0.5)


def test_adapter_saves_and_loads_back_with_identical_logits(tmp_path):
    model, tokenizer = tiny_model()
    peft_model = peft.get_peft_model(model, adapters.peft_config(model, LoraConfig(targets=["attention", "experts"])))
    with torch.no_grad():  # make the adapter non-trivial (B starts at zero)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    inputs = batch(tokenizer)
    peft_model.eval()
    expected = peft_model(**inputs).logits
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()

    fresh, _ = tiny_model()  # same seed: the same base weights
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert torch.equal(loaded(**inputs).logits, expected)
    with loaded.disable_adapter():
        assert not torch.allclose(loaded(**inputs).logits, expected)
    merged = loaded.merge_and_unload()
    assert torch.allclose(merged(**inputs).logits, expected, atol=1e-5)
