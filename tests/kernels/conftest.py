"""What the kernel tests share: their markers, random int8 operands and scales, and an exact
comparison that says where outputs differ."""

from __future__ import annotations

import pytest
import torch

from gradq_fx.kernels import triton_installed, triton_interpreting

# Runs the test in Triton's CPU interpreter (tests/conftest.py says how).
interpret = pytest.mark.interpret
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_installed()) or triton_interpreting(),
    reason="needs a CUDA device, triton, and compiled (not interpreted) kernels",
)

OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_int8(*shape, seed: int, low: int = -128, high: int = 127) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, shape, generator=gen, dtype=torch.int8)


def random_scales(*shape, seed: int) -> torch.Tensor:
    """Positive scales of the size quantization gives (absmax / 127 for values up to ~1)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) * 2e-2 + 1e-4


def assert_equal(out, want):
    assert out.dtype == want.dtype and out.shape == want.shape
    bad = (out != want).nonzero()
    assert bad.numel() == 0, f"{len(bad)} values differ, first at {bad[:3].tolist()}"
