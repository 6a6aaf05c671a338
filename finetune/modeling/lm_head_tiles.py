"""Per-token log-probs of `hidden @ weight.T` on devices without Triton (CPUs): TRL's chunked log-prob kernel with
fewer passes over smaller tiles.

TRL's `ChunkedLogProbFunction` never builds the (tokens, vocabulary) logits at once. On GPUs a Triton kernel folds
each logits tile in one pass; elsewhere its torch fallback runs a dozen whole-tile operations per tile (copies,
masks, an arange per row, separate max/exp/sum passes), on tiles of 4,096 x 4,096 (64 MiB in fp32, far larger than
the CPU's caches). With a narrow hidden size and a big vocabulary (Qwen3's 151,936 rows) those passes, not the
matmuls, take most of the LM head's time. `TiledLogProbs` computes the same outputs with about half the passes,
in place, on tiles that stay in cache: `torch.max` gives the row maximum and the first argmax at once (TRL's
`is_top1` is "the target is the first maximum"), exp and the sums run on the shifted tile, and the backward turns
the recomputed tile into its gradient in place (softmax minus one-hot, scaled) before one addmm per operand.

Where only the hidden states need a gradient through the log-probs (LoRA, the LM head frozen, entropy logged not
trained: every TRL DPO and SFT step), the backward needs no second pass at all. d log p_t / dh = W_t - E_p[W], and
the forward accumulates E_p[W] = sum_v p_v W_v tile by tile (one addmm of the exp tile it already holds, rescaled
with the running maximum) and keeps W[targets] - E_p[W] (tokens x hidden), so the backward is one multiplication:
one matmul and three whole-tile passes per tile fewer than recomputing the logits, and no LM-head weight to gather
(ZeRO-3) in the backward. The recomputing backward gathers it as TRL's kernel does.

Only the plain head is covered (no soft-capping, logit scale or temperature); `supported` says which calls.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's per-token outputs, in order
TOKEN_TILE = 256  # rows of a logits tile: 256 x 4,096 fp32 is 4 MiB, which the passes over it find in cache
VOCAB_TILE = 4096


def supported(hidden: torch.Tensor, softcapping: float | None) -> bool:
    """Whether `TiledLogProbs` serves this call: a device without Triton (where TRL's kernel falls back to torch
    operations) and a head without soft-capping."""
    return hidden.device.type not in ("cuda", "xpu") and softcapping is None


def tiled_log_probs(hidden, weight, bias, targets, fields):
    """`ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, chunk, None, 1.0, fields)` on a CPU:
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), None for what `fields` does not ask."""
    # Only a pass that will be differentiated pays for E_p[W] (grad mode is off inside an autograd Function).
    head_frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    expect_weight = torch.is_grad_enabled() and hidden.requires_grad and head_frozen
    return TiledLogProbs.apply(hidden, weight, bias, targets, fields, expect_weight)


class TiledLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, fields, expect_weight):
        ctx.set_materialize_grads(False)  # entropy is logged, not trained: no zero gradient to fold back
        tiles = [fold_rows(hidden[rows], weight, bias, targets[rows], fields, expect_weight)
                 for rows in token_tiles(hidden)]
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
            torch.cat([tile[field] for tile in tiles]) if field in fields else None for field in FIELDS)
        log_z = torch.cat([tile["log_z"] for tile in tiles])
        log_prob_gradient = None  # d log p_target / d hidden, where the backward can be read off the forward
        if expect_weight:
            log_prob_gradient = weight[targets].float() - torch.cat([tile["expected_weight"] for tile in tiles])
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy, log_prob_gradient)
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq_probs, mean_logits, is_top1) if x is not None))
        return log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, bias, targets, log_z, entropy, log_prob_gradient = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if log_prob_gradient is not None and grad_entropy is None:  # kept only for a frozen head: hidden's gradient
            if grad_log_probs is None:
                return None, None, None, None, None, None
            return (grad_log_probs.float()[:, None] * log_prob_gradient).to(hidden.dtype), None, None, None, None, None
        with maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3 partitioned the head again after the forward
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32) if needs_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if needs_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32) if needs_bias else None
            if grad_log_probs is not None or grad_entropy is not None:
                unfold(hidden, weight, bias, targets, log_z, entropy, grad_log_probs, grad_entropy, grad_hidden,
                       grad_weight, grad_bias)
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


def unfold(hidden, weight, bias, targets, log_z, entropy, grad_log_probs, grad_entropy, grad_hidden, grad_weight,
           grad_bias):
    """The recomputing backward, token tile by token tile."""
    for rows in token_tiles(hidden):
        grads = (None if grad is None else grad[rows].float() for grad in (grad_log_probs, grad_entropy))
        unfold_rows(hidden[rows], weight, bias, targets[rows], log_z[rows], None if entropy is None else entropy[rows],
                    *grads, None if grad_hidden is None else grad_hidden[rows], grad_weight, grad_bias)


def token_tiles(hidden: torch.Tensor):
    return (slice(start, start + TOKEN_TILE) for start in range(0, hidden.shape[0], TOKEN_TILE))


def logits_tiles(hidden, weight, bias):
    """(vocabulary start, fp32 logits of `hidden` against rows start:start+VOCAB_TILE), one buffer reused."""
    buffer = torch.empty(hidden.shape[0], min(VOCAB_TILE, weight.shape[0]), dtype=torch.float32)
    hidden = hidden.float()
    for start in range(0, weight.shape[0], VOCAB_TILE):
        end = min(start + VOCAB_TILE, weight.shape[0])
        tile = buffer[:, :end - start]
        torch.mm(hidden, weight[start:end].float().t(), out=tile)
        if bias is not None:
            tile.add_(bias[start:end].float())
        yield start, tile


def targets_in_tile(targets, start: int, width: int):
    """Each target's column in the vocabulary tile starting at `start`, and whether it falls in the tile."""
    local = targets - start
    return local, (local >= 0) & (local < width)


def fold_rows(hidden, weight, bias, targets, fields, expect_weight: bool):
    """The requested fields of one token tile (fp32, as TRL's), its log-partition `log_z` and, if asked, each
    token's expected LM-head row under its softmax (`expected_weight`, E_p[W]), folding its logits vocabulary tile
    by vocabulary tile with an online maximum (as a streaming logsumexp does)."""
    rows = hidden.shape[0]
    running_max = torch.full((rows,), float("-inf"))
    sum_exp, x_sum_exp, sq_sum_exp, z_sum = (torch.zeros(rows) for _ in range(4))
    argmax, target_logit = torch.zeros(rows, dtype=torch.long), torch.zeros(rows)
    expected_weight = torch.zeros(rows, weight.shape[1]) if expect_weight else None
    for start, tile in logits_tiles(hidden, weight, bias):
        local, in_tile = targets_in_tile(targets, start, tile.shape[1])
        target_logit = torch.where(in_tile, tile.gather(1, local.clamp(0, tile.shape[1] - 1)[:, None])[:, 0],
                                   target_logit)
        if "mean_logits" in fields:
            z_sum += tile.sum(-1)
        tile_max, tile_argmax = tile.max(-1)
        argmax = torch.where(tile_max > running_max, tile_argmax + start, argmax)  # strictly: the first maximum
        new_max = torch.maximum(running_max, tile_max)
        rescale = torch.exp(running_max - new_max)
        shifted = tile.sub_(new_max[:, None])
        exp = torch.exp(shifted)
        tile_sum = exp.sum(-1)
        if "entropy" in fields:  # sum(e * z) = sum(e * (z - max)) + max * sum(e)
            x_sum_exp = x_sum_exp * rescale + torch.linalg.vecdot(exp, shifted) + new_max * tile_sum
        if "log_sum_sq_probs" in fields:
            sq_sum_exp = sq_sum_exp * rescale * rescale + torch.linalg.vecdot(exp, exp)
        sum_exp = sum_exp * rescale + tile_sum
        if expect_weight:
            expected_weight.mul_(rescale[:, None]).addmm_(exp, weight[start:start + tile.shape[1]].float())
        running_max = new_max
    log_z = running_max + torch.log(sum_exp)
    values = {"log_probs": target_logit - log_z, "entropy": log_z - x_sum_exp / sum_exp,
              "log_sum_sq_probs": torch.log(sq_sum_exp) - 2 * torch.log(sum_exp),
              "mean_logits": z_sum / weight.shape[0], "is_top1": argmax == targets}
    if expect_weight:
        expected_weight.div_(sum_exp[:, None])
    return {"log_z": log_z, "expected_weight": expected_weight, **{field: values[field] for field in fields}}


def unfold_rows(hidden, weight, bias, targets, log_z, entropy, grad_log_probs, grad_entropy, grad_hidden,
                grad_weight, grad_bias):
    """Accumulate one token tile's gradients: d log p_t / dz = onehot(t) - p, d entropy / dz = -p (log p + H)."""
    hidden32 = hidden.float()
    for start, tile in logits_tiles(hidden, weight, bias):
        end = start + tile.shape[1]
        log_p = tile.sub_(log_z[:, None])
        if grad_entropy is None:
            grad = log_p.exp_().mul_(-grad_log_probs[:, None])
        else:  # -p * (g_entropy (log p + H) + g_log_probs), the one-hot part below
            p = torch.exp(log_p)
            weight_of_p = log_p.add_(entropy[:, None]).mul_(grad_entropy[:, None])
            if grad_log_probs is not None:
                weight_of_p.add_(grad_log_probs[:, None])
            grad = p.mul_(weight_of_p).neg_()
        if grad_log_probs is not None:
            local, in_tile = targets_in_tile(targets, start, tile.shape[1])
            rows = in_tile.nonzero()[:, 0]
            grad.index_put_((rows, local[rows]), grad_log_probs[rows], accumulate=True)
        if grad_hidden is not None:
            grad_hidden.addmm_(grad, weight[start:end].float())
        if grad_weight is not None:
            grad_weight[start:end].addmm_(grad.t(), hidden32)
        if grad_bias is not None:
            grad_bias[start:end] += grad.sum(0)
