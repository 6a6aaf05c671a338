"""Attention that mixes tokens outside its attention call, on packed rows: the whole module on the padded batch.

Block attention (finetune/training/packed_forward.py) cuts a packed row's attention call into one call per sequence.
That is exact for attention whose only token mixing is that call. Some attention modules also mix tokens before it,
over the whole tensor they are given: DeepSeek Sparse Attention's indexer (deepseek_v32, glm_moe_dsa, hy_v4, axk2,
dots3_note, qwen4_exp) scores every key and keeps the top k under its own causal mask; DeepSeek-V4's compressors
pool every `compress_rate` tokens into one key and index them; Inkling's relative-position bias and log scaling are
built from row indices (0 at the row's start, not the position ids). On a packed row they would read across
sequence boundaries.

Two ways were weighed. Passing the boundaries into each family's indexer, pooling and bias code (masks per
sequence, pooling windows restarting at each boundary, biases from sequence positions) means patching family code
that transformers changes release by release, for each family. Running the whole module per sequence needs no
family code, and is what is done here, in one form: each module runs once per packed row on the padded batch of the
row's sequences, each sequence gathered into its own row (a prompt-shared pair's rejected completion after its
prompt, as recurrent mixers run it: packed_mixers.segments), right-padded to the longest, with the
causal-and-padding mask transformers builds for such a batch (sliding within the module's `sliding_window`), the
model's own attention implementation (sdpa or eager: the DSA modules fold their top-k mask in only under those),
and no generation cache; its outputs are laid back along the row. That is the batch TRL's padded training hands the
module, so its result is the padded batch's by construction, on every device and kernel path, down to top-k ties:
one call per unpadded sequence is not, since torch.topk breaks ties (a tiny indexer scores many keys exactly 0) by
the row's length. The cost is the padded batch's for these modules only; the MoE layers, plain attention layers,
recurrent mixers and the LM head still run on the unpadded row.

Found by structure: in decoder layers whose kind (the config's per-layer list) is not plain attention and that hold
no recurrent mixer (the token mixer of linear-attention and Mamba layers, packed_mixers), the outermost modules whose
class calls an attention function (transformers' ALL_ATTENTION_FUNCTIONS); anywhere, the modules whose class hands a
`position_bias` to that function.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn
from transformers import Cache
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sliding_window_causal_mask_function)

from finetune.modeling import moe
from finetune.training.packed_mixers import along_row, class_source, Segment, recurrent_mixers, segments

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
    """The attention modules of `model` to run on the padded batch of a packed row (see the module docstring)."""
    found = {id(module): module for module in model.modules() if passes_position_bias(type(module))}
    for kind, layer in layers_with_kinds(model):
        if not plain_kind(kind) and not recurrent_mixers(layer):
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


class WholeAttention:
    """How packed_mixers runs one such module: as transformers runs it, with the model's own attention
    implementation; on a packed row, on the padded batch of the row's sequences."""

    # A row holding a single sequence still goes through `row`: the block mask leaves unpadded rows without one.
    cuts_single_sequence = True

    def __init__(self, module: nn.Module, config, implementation: str):
        self.config, self.implementation = config, implementation
        self.window = getattr(module, "sliding_window", None)
        self.signature = inspect.signature(module.forward)

    def whole(self, forward, args, kwargs):
        """A padded batch (its mask made by the model) or a generation step."""
        with own_attention(self.config, self.implementation):
            return forward(*args, **kwargs)

    def row(self, forward, args, kwargs, blocks):
        """The module once over the padded batch of the row's sequences, its outputs laid back along the row."""
        length, sequences = blocks[-1][3], segments(blocks)
        width = max(sequence.size for sequence in sequences)
        index = torch.stack([torch.cat([positions, positions.new_zeros(width - len(positions))])
                             for positions in (sequence.positions() for sequence in sequences)])
        real = torch.arange(width)[None] < torch.tensor([sequence.size for sequence in sequences])[:, None]
        bound = self.signature.bind(*args, **kwargs)
        arguments = padded(dict(bound.arguments), length, index, real)
        if "attention_mask" in self.signature.parameters:
            hidden = next(value for value in arguments.values() if isinstance(value, torch.Tensor))
            arguments["attention_mask"] = padded_mask(
                self.implementation, real.to(hidden.device), self.window, hidden.dtype)
        bound.arguments.update(arguments)
        with own_attention(self.config, self.implementation):
            output = forward(*bound.args, **bound.kwargs)
        return unpadded(output, sequences, width)


def padded(value, length: int, index: torch.Tensor, real: torch.Tensor):
    """`value` as the padded batch of the row's sequences: each tensor laid along the row, (1, length, ...), to
    (sequences, width, ...), sequence i at row positions index[i], zero where `real` is False (the padding); a
    (length, length) table over the row's query and key indices (Inkling's relative distances) to its
    (width, width) corner, the same table over a row of width positions; tuples, lists and dicts item by item; a
    generation cache dropped (a packed row is never a generation step); anything else as it is."""
    if isinstance(value, Cache):
        return None
    if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (length, length) and length > 1:
        return value[:index.shape[1], :index.shape[1]]
    if along_row(value, length):
        rows = value[0][index.to(value.device)]
        fill = real.to(value.device).view(*real.shape, *[1] * (rows.dim() - 2))
        return torch.where(fill, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if isinstance(value, dict):
        return {key: padded(item, length, index, real) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(padded(item, length, index, real) for item in value)
    return value


def unpadded(output, sequences: list[Segment], width: int):
    """The module's output over the padded batch of the row's `sequences` laid back along the row: each sequence's
    own positions (a rejected completion's, after its prompt), joined in row order; entries not laid along the
    batch's sequences (attention weights, which no caller reads in training) as they are."""
    if isinstance(output, (tuple, list)):
        return type(output)(unpadded(item, sequences, width) for item in output)
    if not (isinstance(output, torch.Tensor) and output.dim() >= 2 and output.shape[:2] == (len(sequences), width)):
        return output
    return torch.cat([output[row, sequence.size - sequence.kept:sequence.size]
                      for row, sequence in enumerate(sequences)])[None]


def padded_mask(implementation: str, real: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """The (sequences, 1, width, width) mask transformers makes for a right-padded batch (`real`: its real
    positions): causal, within `window` when the layer slides, padding keys masked; boolean for sdpa, additive for
    eager. Never None: the indexers read it."""
    mask_function = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    sequences, width = real.shape
    return ALL_MASK_ATTENTION_FUNCTIONS[implementation](
        batch_size=sequences, q_length=width, kv_length=width, mask_function=mask_function, attention_mask=real,
        allow_is_causal_skip=False, local_size=window, dtype=dtype, device=real.device)


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
