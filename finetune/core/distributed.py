"""Several processes (`accelerate launch`, `torchrun`): who writes, waiting for each other, sums over ranks.

Every process runs the same stage code. Only the main process writes run-dir files, prints summaries and pushes;
the others wait at barriers, so nobody reads a folder while it is being written. A launcher that sees one process
fail stops the others, so a barrier never waits on a process that died. A single process skips all of this.

Who the main process is comes from the environment: the command line asks it (the run dir's protocol) before
anything is trained, so torch, accelerate and transformers are imported by the functions that use them, not here.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

# Environment variable that turns on the end-of-training check that every process holds the same weights.
CHECK_REPLICAS = "MOETUNE_CHECK_REPLICAS"


def world_size() -> int:
    """Processes in this run: torchrun and accelerate launch set WORLD_SIZE (and RANK) for each one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def process_state():
    """accelerate's process state; the first call joins the process group (gloo on CPU, NCCL on GPUs)."""
    import torch
    from accelerate import PartialState

    # Without cpu=True accelerate only starts a group when it finds GPUs; on a CPU it would silently stay alone.
    return PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    if world_size() > 1:
        process_state().wait_for_everyone()


def leave() -> None:
    """Leave the process group once this process's work is done and saved: wait for the others, then destroy the
    group. Left to the interpreter's exit, gloo's threads are torn down in no set order, and a process could abort
    ("terminate called without an active exception") after everything was written, failing the launch."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def main_process_first():
    """The main process runs the block first; the others run it once it is done (and see what it wrote)."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def sum_across_processes(counts: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a CPU tensor over every process (every process must call this at the same point)."""
    if world_size() == 1:
        return counts
    import torch

    state = process_state()
    total = counts.to(state.device)  # NCCL reduces GPU tensors only
    torch.distributed.all_reduce(total)
    return total.cpu()


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, in name order: equal digests mean bit-identical weights."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas_agree(model: nn.Module, stage: str) -> None:
    """With MOETUNE_CHECK_REPLICAS=1: fail unless every data-parallel process ends with bit-identical weights.

    A debugging aid for DDP runs (ZeRO-3 and FSDP shard the weights, so each process holds different pieces).
    Hashing reads every weight once: seconds for small models, minutes for a 47B one.
    """
    if world_size() == 1 or os.environ.get(CHECK_REPLICAS) != "1":
        return
    if zero3_enabled() or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if is_main_process():
            print(f"[{stage}] {CHECK_REPLICAS}: the weights are sharded (ZeRO-3/FSDP); no replicas to compare.")
        return
    import torch

    digests = [None] * world_size()
    torch.distributed.all_gather_object(digests, weights_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"[{stage}] processes ended with different weights: " +
                           ", ".join(f"rank {rank}: {digest[:12]}" for rank, digest in enumerate(digests)))
    if is_main_process():
        print(f"[{stage}] weights identical on all {world_size()} processes (sha256 {digests[0]})", flush=True)


def warn_if_fsdp_without_gpus() -> None:
    """accelerate runs an FSDP launch on CPUs as plain DDP, without a word: whole weights on every process."""
    import torch

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not torch.cuda.is_available() \
            and is_main_process():
        print("[fsdp] no GPUs: accelerate runs FSDP launches on CPUs as plain DDP (every process holds all the "
              "weights). Use zero3 (DeepSpeed runs on CPUs) or GPUs to shard.", flush=True)


def zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()
