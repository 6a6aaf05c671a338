"""Run a test on each of bitsandbytes' CPU kernel paths, whatever this machine's CPU takes by itself.

bitsandbytes 0.50 chooses its CPU path in two places:
- `bitsandbytes.nn.modules.has_avx512bf16()`, read when a Linear4bit is built: with AVX512-BF16 the layer repacks its
  weight for a bf16 kernel (`_convert_weight_packed_for_cpu`) on its first eval-mode forward without gradients;
- the native `dequantize_4bit` CPU kernel (libbitsandbytes_cpu): its AVX-512 build reads one run of scales per row
  (`absmax[row * (n // blocksize) + col // blocksize]`), its scalar build reads the flattened matrix as quantize_4bit
  wrote it, which is also bitsandbytes' own pure-torch implementation.

The fixture forces one or the other: "avx512bf16" makes has_avx512bf16() true and dequantizes with row-wise scales
(the native kernel where it does so, else `row_blocked_dequantize_4bit`, its pure-torch equivalent); "plain" makes
has_avx512bf16() false and dequantizes with bitsandbytes' pure-torch implementation. The kernel is swapped through
torch's operator registry, where bitsandbytes registers it, and restored after the test module.
"""

from __future__ import annotations

import warnings
from math import prod

import bitsandbytes.functional as bnb_functional
import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code

PATHS = ["avx512bf16", "plain"]


def plain_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    """bitsandbytes' pure-torch dequantize_4bit: blocks over the flattened matrix, as quantize_4bit writes them.
    Called uncompiled: bitsandbytes wraps it in torch.compile, which would compile it anew for every shape."""
    code = _get_4bit_code(quant_type, A.device)
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return compute(A.view(torch.uint8).reshape(-1), absmax, code, blocksize, shape, dtype)


def row_blocked_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    """What the AVX-512 build of bitsandbytes' CPU kernel computes: each row restarts the blocks, reading
    n // blocksize scales per row (csrc/cpu_ops.cpp, dequantizeBlockwise4bitCpu). For rows of whole blocks this is
    the plain result; otherwise the scales drift."""
    m, n = prod(shape[:-1]), shape[-1]
    if n % 16 or blocksize < 16:  # that build's vector loop does not run for these; the scalar one does
        return plain_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    unscaled = plain_dequantize_4bit(A, torch.ones_like(absmax), blocksize, quant_type, shape, torch.float32)
    rows, columns = torch.arange(m)[:, None], torch.arange(n)[None, :]
    scale_index = (rows * (n // blocksize) + columns // blocksize).clamp_max(absmax.numel() - 1)
    return (unscaled.reshape(m, n) * absmax[scale_index]).reshape(shape).to(dtype)


def native_reads_rows() -> bool:
    """Whether this machine's native kernel is the AVX-512 build (probed on a matrix of half-block rows)."""
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    native = bnb_functional.dequantize_4bit(packed, state)
    flat = plain_dequantize_4bit(packed, state.absmax, 64, "nf4", state.shape, torch.float32)
    return not torch.allclose(native, flat)


def use_dequantize_kernel(kernel):
    """Register `kernel` as bitsandbytes' CPU dequantize_4bit; returns the registration, whose _destroy() undoes it."""
    library = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid")
        library.impl("dequantize_4bit", kernel, "CPU")
    return library


@pytest.fixture(scope="module", params=PATHS)
def bnb_kernel_path(request):
    """The test runs once on each CPU path (see the module docstring); the value is the path's name."""
    path = request.param
    if path == "plain":
        kernel = plain_dequantize_4bit
    else:  # the native kernel where it reads rows itself
        kernel = None if native_reads_rows() else row_blocked_dequantize_4bit
    registration = use_dequantize_kernel(kernel) if kernel else None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bnb_modules, "has_avx512bf16", lambda: path == "avx512bf16")
        try:
            yield path
        finally:
            if registration is not None:
                registration._destroy()
