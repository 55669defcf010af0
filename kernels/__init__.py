"""gradq's GEMM kernels. Each file holds one kernel family, its launcher and its CPU path:

- `quantize`: rows to int8 codes and scales (minmax clip, rounding, least-squares scale);
- `iqr`: the `iqr` clipping value of each row;
- `gemm`: the INT8 GEMM (and batched GEMM) with the dequantize in its epilogue;
- `conv`: the INT8 implicit-GEMM convolution, likewise;
- `int_mm`: the exact integer GEMM and convolutions in torch, the references' core;
- `common`: what the kernel files share (where Triton runs, autotuning, argument checks,
  device functions).

A launcher runs its Triton kernel (`use_triton`) on CUDA tensors, and on CPU tensors when
Triton's interpreter is on (TRITON_INTERPRET=1, set before the first `import triton` of the
process: `common`'s docstring says why); everywhere else its pure-torch reference, which has
the same signature.
"""

from __future__ import annotations

from gradq_fx.kernels.common import (
    PERSIST_AUTOTUNING,
    triton_installed,
    triton_interpreting,
    use_triton,
)


def reset_autotuning() -> None:
    """Forget the tile each of gradq's autotuned kernels chose per shape, in this process and
    on disk for the rest of it, so that their next launches tune again, as in a fresh process
    with an empty cache (`bench` does this before it times a cold compile). Triton's
    compiled binaries stay cached."""
    if not triton_installed():
        return
    from triton.runtime.autotuner import Autotuner

    from gradq_fx.kernels import conv, gemm, iqr, quantize

    for module in (conv, gemm, iqr, quantize):
        for value in vars(module).values():
            if isinstance(value, Autotuner):
                value.cache.clear()
                value.cache_results = False


__all__ = [
    "PERSIST_AUTOTUNING",
    "reset_autotuning",
    "triton_installed",
    "triton_interpreting",
    "use_triton",
]
