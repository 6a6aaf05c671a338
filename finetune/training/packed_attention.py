"""Attention that mixes tokens beyond its attention call, on packed rows: the whole module once per sequence.

Block attention (finetune/training/packed_forward.py) cuts a packed row's attention call into one call per sequence.
That is exact for attention whose only token mixing is that call. Some attention modules also mix tokens before it,
over the whole tensor they are given: DeepSeek Sparse Attention's indexer (deepseek_v32, glm_moe_dsa, hy_v4, axk2,
dots3_note, qwen4_exp) scores every key of the row and keeps the top k under its own causal mask; DeepSeek-V4's
compressors pool every `compress_rate` tokens of the row into one key and index them; Inkling's relative-position
bias and log scaling are built from row indices (0 at the row's start, not the position ids). On a packed row these
would read across sequence boundaries, or need the boundaries threaded into each family's indexer, pooling and bias
code (design 2). Instead each such module runs whole, once per sequence, as transformers runs it on a batch holding
only that sequence: its inputs cut to the sequence (packed_mixers.cut), a generation cache dropped, the causal mask
transformers builds for one unpadded sequence (sliding within the module's `sliding_window`), and the model's own
attention implementation (sdpa or eager: the DSA modules only fold their top-k mask in for those two). That is exact
by construction on every device and kernel path, and needs no family code; a prompt-shared pair's rejected
completion runs over the prompt then its own tokens, as recurrent mixers do (packed_mixers.mixer_forward), so
the prompt goes through these modules twice. The cost is that of the padded batch for these modules' indexer and
bias terms (quadratic per sequence, as there), one call per sequence.

Found by structure: in decoder layers whose kind (the config's per-layer list) is not plain attention, the
outermost modules whose class calls an attention function (transformers' ALL_ATTENTION_FUNCTIONS); anywhere, the
modules whose class hands a `position_bias` to that function.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sliding_window_causal_mask_function)

from finetune.modeling import moe

# Layer kinds whose attention is only its attention call; any other kind holds a recurrent mixer (packed_mixers) or
# an attention module run whole per sequence (here), or is refused.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention", "attention"}
# Entries of a per-layer list that name the FFN, not the token mixer (Nemotron-H's layers_block_type mixes both).
FFN_LAYER_TYPES = {"moe", "mlp"}


def layers_with_kinds(model) -> list[tuple[str, nn.Module]]:
    """(kind, decoder layer) from the config's per-layer list (`layer_types`, `layers_block_type`); the whole model
    stands for each layer when there is no list of the same length to pair with them."""
    config = model.config.get_text_config()
    kinds = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None) or []
    layers = [model.get_submodule(name) for name in moe.decoder_layers(model)]
    if len(layers) != len(kinds):
        layers = [model] * len(kinds)
    return list(zip(kinds, layers))


def plain_kind(kind: str) -> bool:
    return kind in ATTENTION_LAYER_TYPES | FFN_LAYER_TYPES


def whole_sequence_attention(model) -> list[nn.Module]:
    """The attention modules of `model` to run whole, once per sequence (see the module docstring)."""
    found = {id(module): module for module in model.modules() if passes_position_bias(type(module))}
    for kind, layer in layers_with_kinds(model):
        if not plain_kind(kind):
            found.update((id(module), module) for module in attention_modules(layer))
    return list(found.values())


def attention_modules(layer: nn.Module) -> list[nn.Module]:
    """The outermost modules inside `layer` whose class calls an attention function, outside the MoE blocks."""
    found: dict[str, nn.Module] = {}
    for name, module in layer.named_modules():
        if not name or any(name.startswith(outer + ".") for outer in found):
            continue
        if calls_attention(type(module)) and not moe.is_moe_subtree(module):
            found[name] = module
    return list(found.values())


@functools.lru_cache(maxsize=None)
def calls_attention(cls: type) -> bool:
    return "ALL_ATTENTION_FUNCTIONS" in class_source(cls)


@functools.lru_cache(maxsize=None)
def passes_position_bias(cls: type) -> bool:
    """Whether the class hands a `position_bias` to its attention function (Inkling's relative logits)."""
    return "position_bias=position_bias" in class_source(cls)


def class_source(cls: type) -> str:
    if issubclass(cls, (nn.ModuleList, nn.ModuleDict, PreTrainedModel)) or cls.__module__.startswith(("torch.", "peft.")):
        return ""
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


class WholeAttention:
    """How packed_mixers runs one such module: with the model's own attention implementation, and on one sequence
    with the causal mask transformers builds for a batch of that sequence alone."""

    # A row holding a single sequence still goes through `sequence`: the block mask leaves unpadded rows without one.
    cuts_single_sequence = True

    def __init__(self, module: nn.Module, config, implementation: str):
        self.config, self.implementation = config, implementation
        self.window = getattr(module, "sliding_window", None)
        self.signature = inspect.signature(module.forward)

    def whole(self, forward, args, kwargs):
        """A padded batch (its mask made by the model) or a generation step, as transformers runs it."""
        with own_attention(self.config, self.implementation):
            return forward(*args, **kwargs)

    def sequence(self, forward, args, kwargs, length: int):
        bound = self.signature.bind(*args, **kwargs)
        if "attention_mask" in self.signature.parameters:
            hidden = next(value for value in bound.arguments.values() if isinstance(value, torch.Tensor))
            bound.arguments["attention_mask"] = sequence_mask(
                self.implementation, length, self.window, hidden.dtype, hidden.device)
        with own_attention(self.config, self.implementation):
            return forward(*bound.args, **bound.kwargs)


def sequence_mask(implementation: str, length: int, window: int | None, dtype: torch.dtype, device) -> torch.Tensor:
    """The (1, 1, length, length) mask transformers makes for one unpadded sequence: causal, within `window` when
    the layer slides; boolean for sdpa, additive for eager. Never None: the indexers read it."""
    mask_function = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    return ALL_MASK_ATTENTION_FUNCTIONS[implementation](
        batch_size=1, q_length=length, kv_length=length, mask_function=mask_function, attention_mask=None,
        allow_is_causal_skip=False, local_size=window, dtype=dtype, device=device)


@contextlib.contextmanager
def own_attention(config, implementation: str):
    """The config set to the model's own attention implementation while a module reads it (the DSA modules only
    apply their top-k mask under "sdpa" or "eager"; the attention function they pick is then the plain one)."""
    current = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = current
