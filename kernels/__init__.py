"""gradq's GEMM kernels. Each file holds one kernel family, its launcher and its CPU path.

Where a launcher runs Triton (`use_triton`): on CUDA tensors, and on CPU tensors when Triton's
interpreter is on (TRITON_INTERPRET=1). Triton reads that variable when a kernel is decorated
and when `triton` itself is imported (its library functions, tl.zeros and tl.rand among them,
are kernels too), so it must be set before the first `import triton` of the process: torch's
Dynamo imports triton, so in practice before `import torch._dynamo` or `import gradq_fx`.
Everywhere else a launcher runs its pure-torch reference, which has the same signature.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_installed() -> bool:
    """Whether `triton` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None, a broken install
        return False


def triton_interpreting() -> bool:
    """Whether Triton's CPU interpreter is requested (TRITON_INTERPRET=1; see module docstring)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a launcher given `tensor` runs its Triton kernel rather than its torch reference."""
    if not triton_installed():
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and triton_interpreting())


# Each autotuned kernel keeps the tile it chose per shape on disk, in Triton's cache directory
# (keyed by the kernel's source, the configs and Triton's version), so that a new process
# launches the chosen tile at once instead of timing every config again.
PERSIST_AUTOTUNING = True


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
