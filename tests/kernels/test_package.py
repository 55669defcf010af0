"""`gradq_fx.kernels`: forgetting the autotuned tiles (what `bench` does before a compile)."""

from __future__ import annotations

import pytest

from gradq_fx import kernels
from gradq_fx.kernels import conv, gemm, iqr, quantize

triton = pytest.importorskip("triton")


def test_reset_autotuning_clears_every_kernels_choices():
    autotuned = [
        gemm._int8_scaled_mm_kernel,
        conv._int8_conv2d_kernel,
        iqr._iqr_clip_kernel,
        quantize._quantize_rows_kernel,
    ]
    for kernel in autotuned:
        kernel.cache[(197, "key")] = kernel.configs[0]  # as a launch would leave it
    kernels.reset_autotuning()
    assert all(kernel.cache == {} for kernel in autotuned)
