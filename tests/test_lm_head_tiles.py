"""moetune's CPU LM-head tiles give what TRL's chunked log-prob kernel gives: every per-token output and every
gradient (hidden states, LM head weight and bias, through the log-probs and the entropy), across tile edges."""

from types import SimpleNamespace

import pytest
import torch
from trl.kernels import ChunkedLogProbFunction

from finetune.modeling import lm_head_tiles
from finetune.modeling.lm_head_tiles import FIELDS, tiled_log_probs

TOKENS, HIDDEN, VOCAB = 70, 64, 1000


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles smaller than the inputs, with ragged last tiles, so every edge is crossed."""
    monkeypatch.setattr(lm_head_tiles, "TOKEN_TILE", 32)
    monkeypatch.setattr(lm_head_tiles, "VOCAB_TILE", 192)


def inputs(with_bias: bool):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.2
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    # a third of the tokens predict their argmax; token 1's target ties with an earlier entry (no top-1 hit, as in
    # TRL: the first maximum wins), token 2 predicts that earlier entry (a hit)
    logits = hidden @ weight.t()
    targets[::3] = logits[::3].argmax(-1)
    weight[499] = weight[500] = hidden[1] / 2
    targets[1], targets[2], hidden[2] = 500, 499, hidden[1]
    bias = torch.randn(VOCAB, generator=generator) if with_bias else None
    if bias is not None:
        bias[500] = bias[499]
    return hidden, weight, bias, targets


def outputs_and_gradients(kernel, hidden, weight, bias, targets, entropy_weight: float):
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    outputs = kernel(*leaves, targets)
    (outputs[0].sum() + entropy_weight * outputs[1].sum()).backward()
    return outputs, [leaf.grad for leaf in leaves if leaf is not None]


def trl(hidden, weight, bias, targets):
    return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, 256, None, 1.0, FIELDS)


def tiled(hidden, weight, bias, targets):
    return tiled_log_probs(hidden, weight, bias, targets, FIELDS)


def hidden_gradient(kernel, hidden, weight, bias, targets, entropy_weight: float):
    """As under LoRA: the LM head frozen, only the hidden states get a gradient."""
    hidden = hidden.clone().requires_grad_()
    outputs = kernel(hidden, weight, bias, targets)
    (outputs[0].sum() + (entropy_weight * outputs[1].sum() if entropy_weight else 0)).backward()
    return outputs, hidden.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("entropy_weight", [0.0, 0.3])
def test_tiles_give_trl_outputs_and_gradients(small_tiles, bias, entropy_weight):
    case = inputs(bias)
    expected, expected_grads = outputs_and_gradients(trl, *case, entropy_weight)
    actual, actual_grads = outputs_and_gradients(tiled, *case, entropy_weight)
    for name, a, e in zip(FIELDS, actual, expected):
        if name == "is_top1":
            assert torch.equal(a, e) and 0 < e.sum() < TOKENS and not e[1] and e[2]
        else:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=name)
    assert len(actual_grads) == (3 if bias else 2)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("entropy_weight", [0.0, 0.3])
def test_frozen_head_backward_reads_the_forward(small_tiles, monkeypatch, entropy_weight):
    """With the LM head frozen and no entropy gradient, the backward uses E_p[W] from the forward (no logits tile is
    computed again) and gives TRL's gradient; an entropy gradient takes the recomputing path, also TRL's."""
    case = inputs(True)
    expected, expected_grad = hidden_gradient(trl, *case, entropy_weight)
    logits_passes = []
    original = lm_head_tiles.logits_tiles
    monkeypatch.setattr(lm_head_tiles, "logits_tiles", lambda *args: logits_passes.append(1) or original(*args))
    actual, actual_grad = hidden_gradient(tiled, *case, entropy_weight)
    token_tiles = -(-TOKENS // lm_head_tiles.TOKEN_TILE)
    assert len(logits_passes) == token_tiles * (2 if entropy_weight else 1)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_only_the_asked_fields_are_computed(small_tiles):
    hidden, weight, _, targets = inputs(False)
    outputs = tiled_log_probs(hidden, weight, None, targets, ("log_probs", "is_top1"))
    assert [output is not None for output in outputs] == [True, False, False, False, True]
    assert outputs[0].dtype == torch.float32 and outputs[4].dtype == torch.bool


def test_bf16_inputs_give_fp32_outputs_as_trl(small_tiles):
    hidden, weight, _, targets = inputs(False)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    expected = trl(hidden, weight, None, targets)[0]
    actual = tiled_log_probs(hidden, weight, None, targets, ("log_probs",))[0]
    assert actual.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-2)


def test_gpus_and_soft_capped_heads_keep_trl_kernel():
    assert lm_head_tiles.supported(torch.zeros(1), None)
    assert not lm_head_tiles.supported(torch.zeros(1), 30.0)
    assert not lm_head_tiles.supported(SimpleNamespace(device=torch.device("cuda")), None)
