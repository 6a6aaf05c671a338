"""Where the conformance tests run: on the CPU in fp32 (the default), or with MOETUNE_TEST_DEVICE=cuda on the GPU in
bf16 (benchmarks/gpu_check.py sets it). A test marked `conformance` builds its models and inputs with these, and
compares two ways of computing the same thing within the tolerance of the dtype."""

import os

import torch

DEVICE = os.environ.get("MOETUNE_TEST_DEVICE", "cpu")
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# Largest difference accepted between two computations of the same result, relative to its size: fp32 rounding, or
# bf16's 8-bit mantissa through a few layers of a tiny model.
SAME_RESULT = 1e-5 if DTYPE == torch.float32 else 2e-2


def trainer_options() -> dict:
    """TrainingArguments fields that put a TRL trainer where the tests run."""
    return {"use_cpu": True, "bf16": False} if DEVICE == "cpu" else {"use_cpu": False, "bf16": True}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())
