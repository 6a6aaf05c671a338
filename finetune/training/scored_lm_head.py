"""The LM head on the scored tokens only, in small tiles: what TRL's fused LM head does on GPUs, on every device.

TRL's trainers call `model(..., labels=labels, fused_lm_head=True)` and read per-token log-probs (and entropy,
top-1 hits for the logged metrics) from a `FusedCausalLMOutput`. Its kernel never builds the (tokens, vocabulary)
logits at once, but without Triton (on a CPU) it scores every position, prompt and padding included, and in tiles
of 4,096 tokens x 32,768 vocabulary entries (512 MiB in fp32, several times that in temporaries). At a 151,936-token
vocabulary the LM head then costs most of an SFT step with assistant-only loss, and its tiles most of the step's
memory. `install_scored_lm_head` answers the same call from the positions whose label is not -100 only, in
vocabulary tiles of LOGPROB_CHUNK (by moetune's CPU kernel, finetune/modeling/lm_head_tiles.py, where speed.tiled_lm_head
serves the call; TRL's kernel otherwise): the same loss, gradients and metrics (zero on unscored positions, as TRL's).

Only heads that are a plain projection are patched (no logit scaling or soft-capping, temperature 1: Mixtral,
Qwen3-MoE, OLMoE and most MoE families); others keep TRL's path.
"""

from __future__ import annotations

import functools
import types

import torch
from torch.distributed.tensor import DTensor
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

from finetune.modeling import lm_head_tiles, moe

LOGPROB_CHUNK = 4096  # vocabulary entries per LM-head tile: bounds the logits held at once
# Config fields by which TRL's head scales or caps the logits (see trl.trainer.utils.add_fused_lm_head).
SCALED_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                      "logits_scaling")


def plain_lm_head(model) -> bool:
    """Whether the model's logits are the LM head's projection, unscaled and uncapped."""
    config = model.config.get_text_config()
    return all(getattr(config, field, None) is None for field in SCALED_HEAD_FIELDS)


def head_logit_scale(config) -> float:
    """The factor the LM head multiplies its logits by, read as TRL's fused head reads it
    (trl.trainer.utils.add_fused_lm_head): Cohere's `logit_scale`, `output_multiplier`, Falcon-H1's
    `lm_head_multiplier`, Granite's 1 / `logits_scaling` (HyperCLOVA X multiplies by it); 1 where none is set."""
    config = config.get_text_config()
    for field in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(config, field, None) is not None:
            return getattr(config, field)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is None:
        return 1.0
    return scaling if config.model_type == "hyperclovax" else 1 / scaling


def scored_log_probs(model, hidden: torch.Tensor, targets: torch.Tensor, fields: tuple[str, ...],
                     softcapping: float | None = None, tiled: bool = True, logit_scale: float = 1.0):
    """TRL's per-token outputs (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1; None where not in
    `fields`) of the rows of `hidden` (tokens, hidden size) predicting `targets`, the logits multiplied by
    `logit_scale`; `tiled`: by moetune's CPU tiles where they serve the call (speed.tiled_lm_head)."""
    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    if isinstance(weight, DTensor):  # FSDP2 shards the head; the kernels read all of it (as TRL's fused head does)
        weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
    with maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3 partitions it outside its own module's forward
        if tiled and lm_head_tiles.supported(hidden, softcapping) and logit_scale == 1.0:
            return lm_head_tiles.tiled_log_probs(hidden, weight, bias, targets, fields)
        return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, LOGPROB_CHUNK, softcapping,
                                            logit_scale, fields)


def router_loss(model, router_logits, attention_mask) -> torch.Tensor:
    """The load-balancing loss TRL's fused head returns (Mixtral's, which every MoE family uses)."""
    return load_balancing_loss_func(router_logits, *moe.routing_sizes(model), attention_mask)


def install_scored_lm_head(model, fields: tuple[str, ...], tiled: bool = True) -> bool:
    """Patch `model` (a *ForCausalLM, after TRL added its fused LM head) so that `fused_lm_head=True` calls score
    only the labelled positions. Returns False, patching nothing, for a head that is not a plain projection."""
    if not plain_lm_head(model):
        return False
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, **kwargs):
        if not fused_lm_head or args:
            return previous(*args, fused_lm_head=fused_lm_head, **kwargs)
        return scored_forward(self, kwargs, fields, tiled)

    model.forward = types.MethodType(forward, model)
    return True


def scored_forward(model, kwargs: dict, fields: tuple[str, ...], tiled: bool) -> FusedCausalLMOutput:
    """TRL's fused forward (trl.trainer.utils.add_fused_lm_head) with only the labelled positions scored."""
    labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    kwargs["use_cache"] = False
    if getattr(model.config.get_text_config(), "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    outputs = model.base_model(**kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    mask = labels != -100
    per_token = scored_log_probs(model, hidden[mask], labels[mask], fields, tiled=tiled)
    # masked_scatter keeps a batch without scored tokens connected to the graph (a zero loss, not a failed backward)
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if values is None else values.new_zeros(mask.shape).masked_scatter(mask, values) for values in per_token)
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = router_loss(model, outputs.router_logits, kwargs.get("attention_mask"))
        loss = loss + getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0) * aux_loss
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=mask, aux_loss=aux_loss)
