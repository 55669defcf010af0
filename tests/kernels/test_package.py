"""`gradq_fx.kernels`: autotuned tiles kept across processes, and forgotten (what `bench` does
before a cold compile)."""

from __future__ import annotations

import pytest

from gradq_fx import kernels
from gradq_fx.kernels import conv, gemm, iqr, quantize

triton = pytest.importorskip("triton")


AUTOTUNED = [
    gemm._int8_scaled_mm_kernel,
    conv._int8_conv2d_kernel,
    iqr._iqr_clip_kernel,
    quantize._quantize_rows_kernel,
]


@pytest.mark.skipif(kernels.triton_interpreting(), reason="the interpreter never autotunes")
def test_chosen_tiles_persist_across_processes_by_default():
    # A fresh import (no reset_autotuning yet in this process): every kernel writes its choice
    # to Triton's cache and reads it back in the next process.
    import subprocess
    import sys

    code = (
        "from gradq_fx.kernels import conv, gemm, iqr, quantize\n"
        "kernels = [gemm._int8_scaled_mm_kernel, conv._int8_conv2d_kernel,\n"
        "           iqr._iqr_clip_kernel, quantize._quantize_rows_kernel]\n"
        "print(all(k.cache_results for k in kernels))"
    )
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert printed.stdout.strip() == "True", printed.stderr[-2000:]


def test_reset_autotuning_clears_every_kernels_choices():
    for kernel in AUTOTUNED:
        kernel.cache[(197, "key")] = kernel.configs[0]  # as a launch would leave it
    kernels.reset_autotuning()
    assert all(kernel.cache == {} for kernel in AUTOTUNED)
    assert not any(kernel.cache_results for kernel in AUTOTUNED)  # nor read from disk
