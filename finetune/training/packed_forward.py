"""The model side of packed preference batches (finetune/training/preference_packing.py).

`install_packed_forward(model)` lets `model(..., packed_input_ids=..., ...)` run the packed row and answer in the
layout of TRL's fused LM head on the padded batch (`FusedCausalLMOutput`, shape (2 * pairs, padded length - 1)),
so TRL's DPO loss, reference pass and metrics run unchanged on it. Without packed keys the forward is TRL's.

Attention runs block by block (one call per sequence, two per prompt-shared pair; also for TRL's padding-free SFT
rows): a dense mask over the whole packed row would cost attention quadratic in the batch's total length. The call
is the model's own attention, sdpa or eager (gpt-oss: eager, for its attention sinks), within the layer's sliding
window if it has one. Layers with a recurrent state (linear attention, Mamba, short convolutions) run their mixer
once per sequence instead (finetune/training/packed_mixers.py); attention modules that also mix tokens outside their
attention call (DeepSeek Sparse Attention's indexer, DeepSeek-V4's compressors, Inkling's row-position bias) run
whole on the padded batch of the row's sequences (finetune/training/packed_attention.py); a model whose layers mix
tokens some other way runs padded batches, with a note saying why (`padding_free_for`). Only the completion tokens'
hidden states go through the LM head (TRL scores every position on CPU), at temperature 1, with the head's logit
scale (Cohere's) and soft-capping as TRL's fused head applies them. The load-balancing loss weighs each token as the
padded batch does: a shared prompt counts twice, padding not at all.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
import types

import torch
from peft import PeftModel
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask
from trl.trainer.utils import FusedCausalLMOutput

from finetune.core import distributed, families
from finetune.training.packed_attention import (
    WholeAttention, attention_modules, layers_with_kinds, plain_kind, whole_sequence_attention)
from finetune.training.packed_mixers import recurrent_mixers, segment_mixers, sequence_mixers
from finetune.training.preference_packing import PACKED_KEYS
from finetune.training.scored_lm_head import head_logit_scale, router_loss, scored_log_probs

# Set while TRL computes reference log-probs: only the log-probs are read then, not the logged metrics' fields.
LOG_PROBS_ONLY = contextvars.ContextVar("log_probs_only", default=False)

BLOCK_ATTENTION = "moetune_blocks"
BLOCK_EAGER_ATTENTION = "moetune_eager_blocks"


def row_blocks(query, key, attention_mask, kwargs) -> list[tuple[int, int, int, int]] | None:
    """The blocks of an unpadded row seen by attention. None for padded batches and cached decoding."""
    if kwargs.get("packed_blocks") is not None:
        return kwargs["packed_blocks"]
    if attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    return sequence_blocks(query.shape[2], kwargs)


def sequence_blocks(length: int, kwargs) -> list[tuple[int, int, int, int]]:
    """The blocks (start, prompt end, split, end) of an unpadded row of `length` tokens: given (packed preference
    batches), TRL's padding-free sequence boundaries (`cu_seq_lens_q`), or where the position ids restart at 0."""
    if kwargs.get("packed_blocks") is not None:
        return kwargs["packed_blocks"]
    if kwargs.get("cu_seq_lens_q") is not None:
        bounds = kwargs["cu_seq_lens_q"].tolist()
    elif kwargs.get("position_ids") is not None:
        bounds = (kwargs["position_ids"][0] == 0).nonzero().flatten().tolist() + [length]
        bounds = bounds if bounds[0] == 0 else [0] + bounds
    else:
        bounds = [0, length]
    return [(start, end, end, end) for start, end in zip(bounds, bounds[1:]) if end > start]


def block_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa within each block of an unpadded row; plain sdpa (with the usual mask) for padded batches."""
    return attention_by_block(sdpa_attention_forward, module, query, key, value, attention_mask, **kwargs)


def block_eager_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager attention (gpt-oss: with its attention sinks) within each block of an unpadded row."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return attention_by_block(eager, module, query, key, value, attention_mask, **kwargs)


def attention_by_block(attention, module, query, key, value, attention_mask, **kwargs):
    """`attention` run block by block over an unpadded row, or once over a padded batch.

    A block is a sequence (chosen, with its prompt), then, when prompt-shared, its rejected completion attending to
    the prompt and itself. Within each, attention is causal and limited to the layer's sliding window if it has one.
    """
    # Attention that is not causal (Inkling 2's attention over a token's earlier layer outputs) is no row's.
    blocks = row_blocks(query, key, attention_mask, kwargs) if getattr(module, "is_causal", True) else None
    kwargs.pop("packed_blocks", None)
    if blocks is None:
        return attention(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    window = kwargs.get("sliding_window")
    # sdpa applies a plain causal mask itself; eager attention and sliding windows need it written out.
    plain_causal = attention is sdpa_attention_forward and window is None
    # torch.split, not slicing: a slice's backward writes a zero tensor the size of the whole row, per block.
    sizes = [size for start, _, split, end in blocks for size in (split - start, end - split)]
    queries, keys, values = (tensor.split(sizes, dim=2) for tensor in (query, key, value))
    outputs = []
    for index, (start, prompt_end, split, end) in enumerate(blocks):
        first, second = 2 * index, 2 * index + 1
        positions = torch.arange(split - start, device=query.device)
        mask = None if plain_causal else block_mask_for(attention, positions, positions, window, query.dtype)
        out, _ = attention(module, queries[first], keys[first], values[first], mask, is_causal=plain_causal, **kwargs)
        outputs.append(out)
        if end > split:  # rejected: sees the prompt and itself, causally, not chosen
            prompt = prompt_end - start
            rejected = torch.arange(prompt, prompt + end - split, device=query.device)
            seen = torch.cat([positions[:prompt], rejected])
            out, _ = attention(
                module, queries[second], torch.cat([keys[first][:, :, :prompt], keys[second]], dim=2),
                torch.cat([values[first][:, :, :prompt], values[second]], dim=2),
                block_mask_for(attention, rejected, seen, window, query.dtype), is_causal=False, **kwargs)
            outputs.append(out)
    return torch.cat(outputs, dim=1), None


def block_mask_for(attention, query_positions, key_positions, window: int | None, dtype: torch.dtype):
    """(1, 1, queries, keys) mask of causal attention within `window` positions: boolean for sdpa, additive for
    eager attention."""
    distance = query_positions[:, None] - key_positions[None, :]
    allowed = (distance >= 0) if window is None else (distance >= 0) & (distance < window)
    if attention is sdpa_attention_forward:
        return allowed[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[None, None]


def block_mask(*args, attention_mask=None, **kwargs):
    """sdpa's mask for padded batches; none for unpadded rows, whose blocks block_attention finds itself (a
    dense mask over a packed row would cost the square of its length to build and to apply)."""
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def block_eager_mask(*args, attention_mask=None, **kwargs):
    """eager attention's mask for padded batches; none for unpadded rows (see block_mask)."""
    return None if attention_mask is None else eager_mask(*args, attention_mask=attention_mask, **kwargs)


# Per attention implementation a model may load with: the block-wise one that replaces it.
BLOCK_ATTENTIONS = {"sdpa": BLOCK_ATTENTION, "eager": BLOCK_EAGER_ATTENTION}
AttentionInterface.register(BLOCK_ATTENTION, block_attention)
AttentionMaskInterface.register(BLOCK_ATTENTION, block_mask)
AttentionInterface.register(BLOCK_EAGER_ATTENTION, block_eager_attention)
AttentionMaskInterface.register(BLOCK_EAGER_ATTENTION, block_eager_mask)
UNSEGMENTED = ("its {kind} layers are neither attention nor hold a recurrent mixer (a module keeping a cached "
               "convolution, recurrent or SSM state) or an attention module that moetune runs per sequence, so tokens "
               "could mix across a packed row's sequence boundaries")


def padding_free_refusal(model) -> str | None:
    """Why `model` cannot run padding-free (packed) batches, or None when it can: its registry entry says, else
    a layer kind mixing tokens neither by attention nor by a module run sequence by sequence."""
    config = model.config.get_text_config()
    reason = families.family_of(model).padding_free or unsegmented_kinds(model)
    implementation = config._attn_implementation
    if reason is None and implementation not in BLOCK_ATTENTIONS and implementation not in BLOCK_ATTENTIONS.values():
        reason = f"it runs {implementation} attention; packed rows need sdpa or eager"
    return reason


def unsegmented_kinds(model) -> str | None:
    """The reason naming the layer kinds (from the config's per-layer list) that are not plain attention and hold
    neither a recurrent mixer nor an attention module (run on the padded batch of the row's sequences); None when
    there are none."""
    missing = sorted({kind for kind, layer in layers_with_kinds(model)
                      if not plain_kind(kind) and not recurrent_mixers(layer) and not attention_modules(layer)})
    return UNSEGMENTED.format(kind=" and ".join(missing)) if missing else None


def padding_free_for(speed, model, stage: str) -> bool:
    """Whether a stage runs padding-free: as the recipe asks, unless the model cannot (then padded, with a note)."""
    if not speed.padding_free:
        return False
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    reason = padding_free_refusal(causal_lm)
    family = model.config.get_text_config().model_type
    if reason is not None and distributed.is_main_process():
        print(f"[{stage}] speed.padding_free is off for {family}: {reason}; batches are padded (same loss, slower).")
    if reason is None and distributed.is_main_process():
        note = per_sequence_note(causal_lm)
        if note:
            print(f"[{stage}] padding-free rows for {family}: {note}.")
    return reason is None


def per_sequence_note(model) -> str:
    """What runs sequence by sequence in `model` on packed rows, in words ("" when only attention, by blocks)."""
    attention = {id(module) for module in whole_sequence_attention(model)}
    found = sequence_mixers(model.base_model, dict.fromkeys(attention))
    recurrent = [type(module).__name__ for module, _ in found.values() if id(module) not in attention]
    whole = [type(module).__name__ for module, _ in found.values() if id(module) in attention]
    notes = []
    if recurrent:
        notes.append(f"its recurrent token mixers ({counted(recurrent)}) run sequence by sequence, each from a fresh "
                     f"state")
    if whole:
        notes.append(f"its attention modules that also mix tokens outside their attention call ({counted(whole)}) "
                     f"run on the padded batch of the row's sequences")
    return "; ".join(notes)


def counted(names: list[str]) -> str:
    return ", ".join(f"{names.count(name)} {name}" for name in sorted(set(names)))


def use_block_attention(model) -> None:
    """The model's attention (sdpa or eager), run block by block over packed rows; not saved with the model."""
    reason = padding_free_refusal(model)
    if reason is not None:
        raise ValueError(f"speed.padding_free cannot run {model.config.get_text_config().model_type}: {reason}. "
                         f"Set speed.padding_free: false.")
    config = model.config.get_text_config()
    implementation = config._attn_implementation
    implementation = next((own for own, block in BLOCK_ATTENTIONS.items() if block == implementation), implementation)
    whole = {id(module): WholeAttention(module, getattr(module, "config", config), implementation)
             for module in whole_sequence_attention(model)}
    model.set_attn_implementation(BLOCK_ATTENTIONS[implementation])
    segment_mixers(model.base_model, sequence_blocks, whole)


def install_packed_forward(model, fields: tuple[str, ...] = ("log_probs",), tiled: bool = True) -> None:
    """Patch `model` (a *ForCausalLM, after TRL added its fused LM head) to understand packed preference batches.

    `fields` are the per-token outputs computed, as in TRL's `add_fused_lm_head`; `tiled`: speed.tiled_lm_head.
    """
    use_block_attention(model)
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        if kwargs.get("packed_input_ids") is None:
            return previous(*args, **{k: v for k, v in kwargs.items() if k not in PACKED_KEYS})
        return packed_forward(self, kwargs, ("log_probs",) if LOG_PROBS_ONLY.get() else fields, tiled)

    model.forward = types.MethodType(forward, model)


@contextlib.contextmanager
def log_probs_only():
    """Packed forwards inside compute the per-token log-probs only (a reference pass reads nothing else)."""
    token = LOG_PROBS_ONLY.set(True)
    try:
        yield
    finally:
        LOG_PROBS_ONLY.reset(token)


def packed_forward(model, batch: dict, fields: tuple[str, ...], tiled: bool) -> FusedCausalLMOutput:
    config = model.config.get_text_config()
    router_logits = bool(batch.get("output_router_logits"))
    hidden = model.base_model(
        input_ids=batch["packed_input_ids"], position_ids=batch["packed_position_ids"],
        packed_blocks=[tuple(block) for block in batch["packed_blocks"].tolist()],
        output_router_logits=router_logits, use_cache=False,
    )
    sources = hidden.last_hidden_state[0].index_select(0, batch["packed_score_source"])
    per_token = scored_log_probs(model, sources, batch["packed_score_token"], fields,
                                 getattr(config, "final_logit_softcapping", None), tiled, head_logit_scale(config))
    rows, length = batch["input_ids"].shape
    where = (batch["packed_score_row"], batch["packed_score_col"])
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if values is None else values.new_zeros(rows, length - 1).index_put(where, values)
        for values in per_token
    )
    aux_loss = None
    if router_logits:
        aux_loss = router_loss(model, hidden.router_logits, batch["packed_router_weights"])
    return FusedCausalLMOutput(
        loss=None, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
        mean_logits=mean_logits, is_top1=is_top1, aux_loss=aux_loss,
        label_mask=torch.zeros(rows, length - 1, dtype=torch.bool, device=log_probs.device).index_put(
            where, torch.ones_like(where[0], dtype=torch.bool)),
    )
