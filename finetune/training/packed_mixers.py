"""Recurrent token mixers on packed rows: each sequence from a fresh state.

A packed row (padding-free SFT, packed DPO) lays sequences end to end. Attention runs block by block
(finetune/training/packed_forward.py), but a recurrent mixer (Mamba and Mamba-2, Gated DeltaNet and other linear
attention, lightning attention, short convolutions) carries its convolution and scan state from one token to the
next, so it would carry it from one sequence into the next. transformers' CUDA kernels can take the boundaries
(`cu_seqlens`, `seq_idx`); its torch fallbacks, on CPU and on GPUs without those kernels, ignore them. Here each
such mixer runs once per sequence, starting from a zero state by construction: exact on every device and kernel
path, at the price of one call per sequence. A prompt-shared pair's rejected completion continues from the prompt:
its mixer call runs over the prompt's tokens then its own and keeps its own outputs (the prompt is run twice
through the mixer, once through attention and the MoE layers, which keep running on the whole row).

The mixers are found by structure: the outermost modules inside the decoder whose class reads or writes a
convolution, recurrent, SSM or linear-attention state of the cache (what every recurrent mixer of transformers
does for cached generation), outside the MoE blocks. The same patching serves attention modules that mix tokens
outside their attention call (finetune/training/packed_attention.py), which run on the padded batch of the row's
sequences instead.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
from typing import NamedTuple

import torch
from torch import nn
from transformers import Cache, PreTrainedModel

from finetune.modeling import moe

# What a recurrent mixer's class does with the generation cache: the states that flow from token to token.
CACHED_STATE = re.compile(r"conv_state|recurrent_state|ssm_state|linear_cache")
# Keyword arguments that describe the whole packed row: a single sequence's call does without them.
ROW_KWARGS = ("packed_blocks", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


@functools.lru_cache(maxsize=None)
def carries_state(cls: type) -> bool:
    """Whether a module class keeps a state across tokens: its source handles a cached recurrent state."""
    return bool(CACHED_STATE.search(class_source(cls)))


def class_source(cls: type) -> str:
    """The source of a model's own module class; "" for containers, whole models, torch's and peft's modules."""
    if issubclass(cls, (nn.ModuleList, nn.ModuleDict, PreTrainedModel)) or cls.__module__.startswith(("torch.", "peft.")):
        return ""
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


class Recurrent:
    """How a recurrent mixer runs: as it is on a padded batch, once per sequence (from a zero state) on a row."""

    cuts_single_sequence = False  # a row of one plain sequence runs whole, with the row's own kernel inputs

    def whole(self, forward, args, kwargs):
        return forward(*args, **kwargs)

    def row(self, forward, args, kwargs, blocks):
        return per_sequence(forward, args, kwargs, blocks)


RECURRENT = Recurrent()


def sequence_mixers(backbone: nn.Module, others: dict | None = None) -> dict[str, tuple[nn.Module, object]]:
    """The outermost modules of a decoder that run sequence by sequence, with how each runs: its recurrent mixers
    (state-carrying modules, outside the MoE blocks) and `others` (id(module) -> how it runs: attention modules
    run whole per sequence, finetune/training/packed_attention.py)."""
    others = others or {}
    found: dict[str, tuple[nn.Module, object]] = {}
    for name, module in backbone.named_modules():
        if not name or any(name.startswith(outer + ".") for outer in found):
            continue
        if id(module) in others:
            found[name] = (module, others[id(module)])
        elif carries_state(type(module)) and not moe.is_moe_subtree(module):
            found[name] = (module, RECURRENT)
    return found


def recurrent_mixers(backbone: nn.Module) -> dict[str, nn.Module]:
    """The outermost state-carrying modules of a decoder (not the decoder itself, nothing holding experts)."""
    return {name: module for name, (module, _) in sequence_mixers(backbone).items()}


class RowSequences:
    """The sequences of the packed row the decoder is running, shared by its mixers: blocks (start, prompt end,
    split, end) as in packed_forward.row_blocks, or None for padded batches and generation steps. Set at each
    decoder forward and read again when activation checkpointing recomputes a layer in the backward (the same
    step's batch)."""

    def __init__(self):
        self.blocks: list[tuple[int, int, int, int]] | None = None


def segment_mixers(backbone: nn.Module, row_blocks, others: dict | None = None) -> dict[str, nn.Module]:
    """Patch the decoder `backbone` so that its recurrent mixers and `others` (see sequence_mixers) run sequence
    by sequence on packed rows.

    `row_blocks(length, kwargs)` reads a decoder call's blocks (None: a padded batch). Returns the modules found."""
    found = sequence_mixers(backbone, others)
    if not found or hasattr(backbone, "moetune_sequences"):
        return {name: module for name, (module, _) in found.items()}
    backbone.moetune_sequences = sequences = RowSequences()
    backbone.moetune_unsegmented_forward = backbone.forward
    backbone.moetune_row_blocks = row_blocks
    backbone.forward = types.MethodType(decoder_forward, backbone)
    for mixer, runner in found.values():
        mixer.moetune_sequences = sequences
        mixer.moetune_runner = runner
        mixer.moetune_unsegmented_forward = mixer.forward
        mixer.forward = types.MethodType(mixer_forward, mixer)
    return {name: module for name, (module, _) in found.items()}


def decoder_forward(self, *args, **kwargs):
    """The decoder's forward, after noting the sequences of the row it runs (none for a padded batch or a step of
    cached generation)."""
    tokens = kwargs.get("input_ids", args[0] if args else None)
    tokens = tokens if tokens is not None else kwargs.get("inputs_embeds")
    cached = kwargs.get("cache", kwargs.get("past_key_values")) is not None
    blocks = None
    if tokens is not None and tokens.shape[0] == 1 and kwargs.get("attention_mask") is None and not cached:
        blocks = self.moetune_row_blocks(tokens.shape[1], kwargs)
    self.moetune_sequences.blocks = blocks or None
    return self.moetune_unsegmented_forward(*args, **kwargs)


def mixer_forward(self, *args, **kwargs):
    """The mixer on the sequences of a packed row (see its runner's `row`), or as it is on a padded batch."""
    blocks, runner, forward = self.moetune_sequences.blocks, self.moetune_runner, self.moetune_unsegmented_forward
    # One plain sequence needs no cutting for a recurrent mixer (a padded batch of one).
    if blocks is None or (not runner.cuts_single_sequence and len(blocks) == 1 and blocks[0][2] == blocks[0][3]):
        return runner.whole(forward, args, kwargs)
    return runner.row(forward, args, {key: value for key, value in kwargs.items() if key not in ROW_KWARGS}, blocks)


class Segment(NamedTuple):
    """One sequence of a packed row as a mixer runs it: the row's ranges (start, end) it runs over, in order (a
    block's sequence; a prompt-shared pair's rejected completion after its prompt), and how many of its last
    positions are its own outputs (all of a block's sequence; the completion's of a rejected one)."""

    ranges: tuple[tuple[int, int], ...]
    kept: int

    @property
    def size(self) -> int:
        return sum(end - start for start, end in self.ranges)

    def positions(self) -> torch.Tensor:
        return torch.cat([torch.arange(start, end) for start, end in self.ranges])

    def where(self) -> slice | torch.Tensor:
        """Its positions as cut takes them: a slice (a view of the row) when they are one range."""
        return slice(*self.ranges[0]) if len(self.ranges) == 1 else self.positions()


def segments(blocks) -> list[Segment]:
    """The sequences of a packed row of blocks (start, prompt end, split, end), in row order: each block's sequence,
    then its rejected completion after the prompt when the block is a prompt-shared pair."""
    found = []
    for start, prompt_end, split, end in blocks:
        found.append(Segment(((start, split),), split - start))
        if end > split:
            found.append(Segment(((start, prompt_end), (split, end)), end - split))
    return found


def per_sequence(forward, args, kwargs, blocks):
    """`forward` run once per sequence of a packed row (rejected completions after their prompt), outputs joined."""
    length = blocks[-1][3]
    outputs = []
    for segment in segments(blocks):
        run = cut((args, kwargs), length, segment.where())
        output = forward(*run[0], **run[1])
        # rejected: the mixer ran over the prompt, then the completion; the completion's outputs are kept
        outputs.append((output if segment.kept == segment.size else tail(output, segment.kept), segment.kept))
    return joined(outputs)


def along_row(value, length: int) -> bool:
    """Whether `value` is a tensor laid along a row of `length` positions: shape (1, length, ...)."""
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == length


def cut(value, length: int, where: slice | torch.Tensor):
    """`value` with every tensor laid along the row cut to one sequence: the row positions `where` (a slice, or a
    tensor of indices); tuples, lists and dicts cut item by item; a generation cache dropped (each sequence starts
    from a zero state, and a packed row is never a generation step); anything else as it is."""
    if isinstance(value, Cache):
        return None
    if along_row(value, length):
        return value[:, where] if isinstance(where, slice) else value.index_select(1, where.to(value.device))
    if isinstance(value, dict):
        return {key: cut(item, length, where) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(cut(item, length, where) for item in value)
    return value


def tail(output, count: int):
    """The last `count` positions of a mixer's output over prompt and completion: its tensors laid along that
    sequence (a tensor, or a tuple's), the rest as it is."""
    if isinstance(output, torch.Tensor):
        return output[:, -count:]
    return type(output)(item[:, -count:] if isinstance(item, torch.Tensor) and item.dim() >= 2 else item
                        for item in output)


def joined(outputs: list[tuple]):
    """The per-sequence outputs (with their lengths) joined along the row: the tensors laid along each sequence
    concatenated; any other entry of a tuple output (a state, attention weights: no caller reads them in training)
    taken from the first sequence."""
    first = outputs[0][0]
    if isinstance(first, torch.Tensor):
        return torch.cat([output for output, _ in outputs], dim=1)
    return type(first)(
        torch.cat([output[i] for output, _ in outputs], dim=1)
        if all(along_row(output[i], size) for output, size in outputs) else item
        for i, item in enumerate(first))
