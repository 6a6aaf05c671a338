"""Where the conformance tests run: on the CPU in fp32 (the default), or with MOETUNE_TEST_DEVICE=cuda on the GPU in
bf16 (benchmarks/gpu_check.py sets it). A test marked `conformance` builds its models and inputs with these, and
compares two ways of computing the same thing within the tolerance of the dtype."""

import os

import torch

DEVICE = os.environ.get("MOETUNE_TEST_DEVICE", "cpu")
# MOETUNE_TEST_DTYPE=bfloat16 on the CPU tries the bf16 tolerances on a machine without a GPU.
DTYPE = getattr(torch, os.environ.get("MOETUNE_TEST_DTYPE", "bfloat16" if DEVICE == "cuda" else "float32"))
# Largest difference accepted between two computations of the same result, relative to its size: fp32 rounding, or
# bf16's 8-bit mantissa through a few layers of a tiny model (LoRA on NF4 experts against PEFT's LoRA on the rounded
# weights differed by 0.040 in bf16 on a CPU, MOETUNE_TEST_DTYPE=bfloat16).
SAME_RESULT = 1e-5 if DTYPE == torch.float32 else 5e-2


# Test files whose every test is a conformance test (tests/conftest.py marks them), beside the tests marked one by
# one; the GPU check (benchmarks/gpu_check.py) runs those files.
CONFORMANCE_FILES = ("test_conformance", "test_famil")


def trainer_options() -> dict:
    """TrainingArguments fields that put a TRL trainer where the tests run."""
    return {"use_cpu": True, "bf16": False} if DEVICE == "cpu" else {"use_cpu": False, "bf16": True}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())
