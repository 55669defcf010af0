"""What gradq's kernel files share: when to run Triton, how to autotune, argument checks, and
the device functions that more than one kernel calls.

Each kernel file (quantize.py, iqr.py, gemm.py, conv.py) keeps its own shape: a docstring on
its numerics, a launcher registered as a torch.library op that validates its input (with the
checks below) and runs either its private @triton.jit kernel or, where `launches_triton` says
no, its pure-torch reference with the same signature.

- Where Triton runs (`use_triton`): on CUDA tensors, and on CPU tensors when Triton's
  interpreter is on (TRITON_INTERPRET=1). Triton reads that variable when a kernel is
  decorated and when `triton` itself is imported (its library functions, tl.zeros and tl.rand
  among them, are kernels too), so it must be set before the first `import triton` of the
  process: torch's Dynamo imports triton, so in practice before `import torch._dynamo` or
  `import gradq_fx`.
- `triton` and `tl` below are the modules, or None where Triton does not import (then every
  launcher runs its reference, on every device, and no kernel is defined).
- Device functions (@triton.jit, called from the kernels of other files; Triton inlines them,
  so a kernel compiles as if their bodies were written in it): `round_half_even`,
  `clip_scale`, `grouped_tile`, `dequantize_tile`, `store_tile`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the launchers run their torch references on every device
    triton = tl = None

# --------------------------------------------------------------------------- where Triton runs


@functools.cache
def triton_installed() -> bool:
    """Whether `triton` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None, a broken install
        return False


def triton_interpreting() -> bool:
    """Whether Triton's CPU interpreter is requested (TRITON_INTERPRET=1; module docstring)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a launcher given `tensor` runs its Triton kernel rather than its torch reference."""
    if not triton_installed():
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and triton_interpreting())


def launches_triton(tensor: torch.Tensor) -> bool:
    """`use_triton`, and Triton imported here: what each launcher asks before it launches its
    kernel; where this is False it returns its torch reference instead."""
    return triton is not None and use_triton(tensor)


# --------------------------------------------------------------------------- autotuning

# Each autotuned kernel keeps the tile it chose per shape on disk, in Triton's cache directory
# (keyed by the kernel's source, the configs and Triton's version), so that a new process
# launches the chosen tile at once instead of timing every config again.
PERSIST_AUTOTUNING = True


def autotune(key: list[str], cuda_configs: list, interpreter_configs: list):
    """`triton.autotune` over `cuda_configs`, or over `interpreter_configs` in Triton's
    interpreter (it cannot autotune over several configs, and small tiles keep ragged edges
    and multi-tile rows reachable at test sizes); tiles persist (`PERSIST_AUTOTUNING`)."""
    configs = interpreter_configs if triton.knobs.runtime.interpret else cuda_configs
    return triton.autotune(configs=configs, key=key, cache_results=PERSIST_AUTOTUNING)


def tile_config(block_m, block_n, block_k, stages, warps, group_m=8):
    """An autotune config of a GEMM-tiled kernel (gemm.py, conv.py)."""
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m}
    return triton.Config(meta, num_stages=stages, num_warps=warps)


# --------------------------------------------------------------------------- argument checks
#
# Each raises a ValueError that starts with the launcher's name (`op`) and names the argument.

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = {
    torch.int8: "int8",
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


def qmax(bits: int) -> int:
    """The largest code of a symmetric `bits`-wide integer grid: 2^(bits - 1) - 1."""
    return 2 ** (bits - 1) - 1


def describe(value) -> str:
    """What an error message says it got: a tensor's dtype and shape, else the type."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} of shape {tuple(value.shape)}"
    return str(type(value))


def check_tensor(op: str, name: str, value, dims: int, dtypes: tuple) -> None:
    """`value` is a `dims`-D tensor of one of `dtypes`."""
    if not isinstance(value, torch.Tensor) or value.dim() != dims or value.dtype not in dtypes:
        kinds = "/".join(_DTYPE_NAMES[dtype] for dtype in dtypes)
        raise ValueError(f"{op}: {name} must be a {dims}-D {kinds} tensor, got {describe(value)}")


def check_rows(op: str, x, bits) -> None:
    """x is rows to quantize (a 2-D float tensor with at least one column) and bits a width
    from 2 to 8."""
    check_tensor(op, "x", x, 2, FLOAT_DTYPES)
    if x.shape[1] == 0:
        raise ValueError(f"{op}: x must have at least one column (nothing to scale by)")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{op}: bits must be an integer from 2 to 8, got {bits!r}")


def check_scales(op: str, name: str, value, shape: tuple) -> None:
    """`value` is a float32 tensor of `shape` (a GEMM operand's scales)."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
        raise ValueError(f"{op}: {name} must be a float32 tensor, got {value!r}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(value.shape)}")


def check_epilogue(op: str, bias, columns: int, out_dtype) -> None:
    """bias is None or a float tensor [columns]; out_dtype one of the float dtypes."""
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: bias must be a float tensor or None, got {bias!r}")
        if tuple(bias.shape) != (columns,):
            raise ValueError(f"{op}: bias must have shape ({columns},), got {tuple(bias.shape)}")
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")


def check_devices(op: str, first: str, tensors: dict) -> None:
    """Every tensor of `tensors` (name: tensor or None) is on the device of the one named
    `first`."""
    device = tensors[first].device
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{op}: {name} is on {tensor.device}, {first} on {device}")


# --------------------------------------------------------------------------- device functions

if triton is not None:
    # The GEMM-tiled kernels' one interpreter config: a small tile (the interpreter runs
    # every config it is given).
    GEMM_INTERPRETER_CONFIGS = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4})
    ]

    @triton.jit
    def round_half_even(v):
        """v rounded to the nearest integer, ties to even (as torch.round), for |v| < 2^22.

        v + 1.5 * 2^23 lands in [2^23, 2^24), where float32 values are spaced exactly 1 apart,
        so the float addition (itself round to nearest even) rounds v, and subtracting the
        constant again is exact. It avoids libdevice's rint, which Triton's CPU interpreter
        lacks. Compilers may not fold (v + c) - c without fast-math reassociation, which
        Triton does not enable. Callers clamp v to [-qmax, qmax] first.
        """
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def clip_scale(clip, QMAX: tl.constexpr):
        """`quantizer.scale_of` without its NaN: clip / qmax where clip > 0, else 1.

        An IEEE float32 division rounded to nearest (`div_rn`): on a GPU, Triton's plain `/`
        on float32 may compile to an approximate division, which would move codes that sit on
        a rounding boundary. torch divides correctly rounded, so the scale is bit-equal.
        """
        return tl.where(clip > 0, tl.math.div_rn(clip, QMAX * 1.0), 1.0)

    @triton.jit
    def grouped_tile(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of output tile number `tile` of a tiles_m x tiles_n grid, in grouped
        order: tiles go down GROUP_M rows of tiles before moving right, so that programs
        running together share operand tiles in L2."""
        group = tile // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (tile % (GROUP_M * tiles_n)) % group_rows
        pid_n = (tile % (GROUP_M * tiles_n)) // group_rows
        return pid_m, pid_n

    @triton.jit
    def dequantize_tile(
        acc, row_scale, col_scale, bias_ptr, offs_n, stride_bias, mask_n, HAS_BIAS: tl.constexpr
    ):
        """float32(acc) * row_scale[:, None] * col_scale[None, :] (+ bias[offs_n][None, :]):
        the reference's float32 operations in its order (`quantizer.quantized_matmul`). The
        kernels launch with `enable_fp_fusion=False`, so that no fused multiply-add (one
        rounding instead of two) changes the last product and sum: float32 is bit-equal."""
        out = acc.to(tl.float32) * row_scale[:, None] * col_scale[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n).to(tl.float32)
            out = out + bias[None, :]
        return out

    @triton.jit
    def store_tile(out_ptrs, out, mask, OUT_BF16: tl.constexpr):
        """Store the float32 tile `out` in the output's dtype, rounded to nearest even.

        bfloat16 is rounded with integer operations on the float32 bits (add 0x7FFF plus the
        lowest kept bit, keep the top 16 bits; a NaN stays a quiet NaN rather than carrying
        into the exponent): the interpreter's float32 -> bfloat16 cast truncates, and a GPU's
        rounding cast gives the same bits as this one, so one code path is exact on both.
        float16 uses the plain cast (round to nearest even in numpy and on GPUs).
        """
        if OUT_BF16:
            bits = out.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            bits = tl.where(out != out, 0x7FC00000, bits)
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            tl.store(out_ptrs, rounded, mask=mask)
        else:
            tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=mask)
