"""Load balancing beyond the aux loss: the aux-loss-free bias update and the router z-loss."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from finetune.training import balancing, expert_load
from finetune.modeling import moe
from finetune.config.recipe import ModelInit, RecipeError
from finetune.config.parsing import parse_recipe
from finetune.modeling.tiny import init_config, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([f"word{i} and more text {i * 7}" for i in range(200)], vocab_size=256)


def tiny(architecture, tokenizer):
    init = ModelInit(architecture=architecture, hidden_size=64, intermediate_size=128, num_experts=4,
                     experts_per_token=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(init_config(init, tokenizer))


def load_cv(model, tracker, input_ids) -> float:
    """Mean over MoE layers of the expert-load coefficient of variation on one batch."""
    tracker.take()
    model(input_ids=input_ids)
    shares = tracker.take().values()
    return sum(expert_load.coefficient_of_variation(s) for s in shares) / len(shares)


def test_bias_update_lowers_the_load_imbalance_of_a_skewed_stream(tokenizer):
    model = tiny("deepseek_v3", tokenizer)
    generator = torch.Generator().manual_seed(0)
    skewed_tokens = torch.arange(10, 18)  # a stream that uses a few tokens only routes them to a few experts

    def skewed_batch():
        return skewed_tokens[torch.randint(0, len(skewed_tokens), (4, 32), generator=generator)]

    evaluation = skewed_batch()
    tracker = expert_load.ExpertLoadTracker(model)
    before = load_cv(model, tracker, evaluation)
    update = balancing.BiasUpdate(model, rate=0.002)
    for _ in range(60):
        model(input_ids=skewed_batch())
        update.update()
    after = load_cv(model, tracker, evaluation)
    assert before > 0.3 and after < before / 2
    bias = next(iter(moe.bias_tensors(model).values()))
    assert 0 < bias.abs().max() <= 60 * 0.002 + 1e-6  # each step moves each expert's bias by the rate at most


def test_bias_update_is_refused_for_a_family_without_a_bias(tokenizer):
    with pytest.raises(ValueError, match="no e_score_correction_bias"):
        balancing.BiasUpdate(tiny("mixtral", tokenizer), rate=0.001)


def test_router_z_loss_is_the_mean_squared_logsumexp_of_real_tokens(tokenizer):
    model = tiny("mixtral", tokenizer)
    z_loss = balancing.RouterZLoss(model)
    input_ids = torch.randint(5, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    output = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    real = attention_mask.reshape(-1).bool()
    expected = torch.stack([torch.logsumexp(logits[real], dim=-1).square().mean()
                            for logits in output.router_logits]).mean()
    value = z_loss.take()
    torch.testing.assert_close(value, expected)
    value.backward()  # it trains: the gradient reaches the router
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    assert z_loss.take() is None  # taken once


def test_balancing_recipe_keys_are_checked():
    recipe = parse_recipe({"run_dir": "out", "model": {"init": {}}, "balancing": {"router_z_loss_coef": 0.001}}, "r.yaml")
    assert recipe.balancing.router_z_loss_coef == 0.001 and recipe.balancing.bias_update_rate == 0.0
    with pytest.raises(RecipeError, match="balancing.bias_update_rate"):
        parse_recipe({"run_dir": "out", "model": {"init": {}}, "balancing": {"bias_update_rate": -1}}, "r.yaml")
