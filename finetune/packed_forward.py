"""The model side of packed preference batches (finetune/preference_packing.py).

`install_packed_forward(model)` lets `model(..., packed_input_ids=..., ...)` run the packed row and answer in the
layout of TRL's fused LM head on the padded batch (`FusedCausalLMOutput`, shape (2 * pairs, padded length - 1)),
so TRL's DPO loss, reference pass and metrics run unchanged on it. Without packed keys the forward is TRL's.

Attention runs block by block (one sdpa call per sequence, two per prompt-shared pair): a dense mask over the
whole packed row would cost attention quadratic in the batch's total length. Only the completion tokens' hidden
states go through the LM head (TRL scores every position on CPU). The load-balancing loss weighs each token as
the padded batch does: a shared prompt counts twice, padding not at all.
"""

from __future__ import annotations

import functools
import types

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import FusedCausalLMOutput

from finetune.preference_packing import PACKED_KEYS

BLOCK_ATTENTION = "moetune_blocks"
LOGPROB_CHUNK = 4096  # tokens per LM-head tile: bounds the (tokens, vocab) logits held at once


def sequence_blocks(cu_seq_lens: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Blocks of a padding-free SFT row from TRL's sequence boundaries (`cu_seq_lens_q`)."""
    bounds = cu_seq_lens.tolist()
    return [(start, end, end, end) for start, end in zip(bounds, bounds[1:]) if end > start]


def block_attention(module, query, key, value, attention_mask, packed_blocks=None, **kwargs):
    """sdpa within each block of a packed row; plain sdpa (with the usual mask) for ordinary batches."""
    if packed_blocks is None and kwargs.get("cu_seq_lens_q") is not None and query.shape[0] == 1:
        packed_blocks = sequence_blocks(kwargs["cu_seq_lens_q"])
    if packed_blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    outputs = []
    for start, prompt_end, split, end in packed_blocks:
        part = slice(start, split)
        out, _ = sdpa_attention_forward(module, query[:, :, part], key[:, :, part], value[:, :, part], None,
                                        is_causal=True, **kwargs)
        outputs.append(out)
        if end > split:  # rejected: sees the prompt and itself, causally, not chosen
            keys = torch.cat([key[:, :, start:prompt_end], key[:, :, split:end]], dim=2)
            values = torch.cat([value[:, :, start:prompt_end], value[:, :, split:end]], dim=2)
            prompt_length = prompt_end - start
            mask = torch.ones(end - split, prompt_length + end - split, dtype=torch.bool, device=query.device)
            out, _ = sdpa_attention_forward(module, query[:, :, split:end], keys, values,
                                            mask.tril(diagonal=prompt_length)[None, None], is_causal=False, **kwargs)
            outputs.append(out)
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(BLOCK_ATTENTION, block_attention)
AttentionMaskInterface.register(BLOCK_ATTENTION, sdpa_mask)  # ordinary batches get sdpa's masks


def use_block_attention(model) -> None:
    """sdpa that also runs packed rows block by block; the setting is not saved with the model."""
    if model.config._attn_implementation not in ("sdpa", BLOCK_ATTENTION):
        raise ValueError(f"speed.padding_free needs sdpa attention; this model uses {model.config._attn_implementation}. "
                         "Set speed.padding_free: false.")
    model.set_attn_implementation(BLOCK_ATTENTION)


def install_packed_forward(model, fields: tuple[str, ...] = ("log_probs",)) -> None:
    """Patch `model` (a *ForCausalLM, after TRL added its fused LM head) to understand packed preference batches.

    `fields` are the per-token outputs computed, as in TRL's `add_fused_lm_head`.
    """
    use_block_attention(model)
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        if kwargs.get("packed_input_ids") is None:
            return previous(*args, **{k: v for k, v in kwargs.items() if k not in PACKED_KEYS})
        return packed_forward(self, kwargs, fields)

    model.forward = types.MethodType(forward, model)


def packed_forward(model, batch: dict, fields: tuple[str, ...]) -> FusedCausalLMOutput:
    config = model.config.get_text_config()
    router_logits = bool(batch.get("output_router_logits"))
    hidden = model.base_model(
        input_ids=batch["packed_input_ids"], position_ids=batch["packed_position_ids"],
        packed_blocks=[tuple(block) for block in batch["packed_blocks"].tolist()],
        output_router_logits=router_logits, use_cache=False,
    )
    lm_head = model.get_output_embeddings()
    sources = hidden.last_hidden_state[0].index_select(0, batch["packed_score_source"])
    per_token = ChunkedLogProbFunction.apply(
        sources, lm_head.weight, lm_head.bias, batch["packed_score_token"], 1.0, LOGPROB_CHUNK,
        getattr(config, "final_logit_softcapping", None), 1.0, fields,
    )
    rows, length = batch["input_ids"].shape
    where = (batch["packed_score_row"], batch["packed_score_col"])
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if values is None else values.new_zeros(rows, length - 1).index_put(where, values)
        for values in per_token
    )
    aux_loss = None
    if router_logits:
        aux_loss = load_balancing_loss_func(hidden.router_logits, config.num_experts, config.num_experts_per_tok,
                                            batch["packed_router_weights"])
    return FusedCausalLMOutput(
        loss=None, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
        mean_logits=mean_logits, is_top1=is_top1, aux_loss=aux_loss,
        label_mask=torch.zeros(rows, length - 1, dtype=torch.bool, device=log_probs.device).index_put(
            where, torch.ones_like(where[0], dtype=torch.bool)),
    )
