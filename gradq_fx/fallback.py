"""Per-shape fallback: a quantized GEMM whose INT8 path is slower than float runs in float.

INT8 trades accuracy for speed, and the trade only pays where the INT8 path is faster. On an
H100 a Triton INT8 GEMM was reported at 1.10-1.26x of cuBLAS bf16 on most ViT-B shapes but at
0.60x on 12608 x 768 x 768, and small GEMMs are launch-bound, where quantizing both operands
costs more launches than it saves. So under `Fallback.SLOWER` (the default) the planning step
(`gradq_fx.plan`) asks `speedup` about every INT8 GEMM that a measured lowering (`triton`,
`fused`) would run on CUDA, and a GEMM whose INT8 path measures slower runs as the float GEMM
it replaces; the report names it "float fallback (INT8 0.62x)".

What is timed, on the GEMM's device, with random operands of its shapes, strides and dtype:
- INT8: the chosen lowering's `mm` (or `conv2d`) with the GEMM's specs, run eagerly: the
  operands quantized as that lowering quantizes them (per-row iqr clips included), then the
  INT8 GEMM with its dequantize epilogue. Under `fused`, compiled code folds part of the
  quantize into the operands' producers, which an eager call cannot, so there the rule errs
  towards float.
- float: `lowerings.reference.float_mm` (or `float_conv2d`), the GEMM in the operands' dtype:
  what the model runs without gradq.
Each is the median of `ITERS` calls after `WARMUP` (the first call autotunes the kernels),
timed with CUDA events, once per process per GEMM signature (op, shapes, strides, dtypes,
specs, role, lowering; not the module). Only CUDA is measured: on the CPU the lowering is the
reference, whose speed no-one trains for. Shapes that are not concrete integers (dynamic
shapes) are not measured, and stay INT8. A compiled graph found in Inductor's FX graph cache
keeps the decisions made when it was compiled on this machine.

Timings are noisy: a GEMM whose two paths run within a few percent of each other may land on
either side of 1 from one process to the next, and so train in INT8 in one run and in float
in another. `fallback=never` keeps every quantized GEMM in INT8, for runs that must repeat.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from gradq_fx.config import QuantSpec, Role
from gradq_fx.lowerings import GemmLowering, reference

WARMUP = 3
ITERS = 20


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One measured GEMM signature: float time / INT8 time (`speedup`, below 1: falls back)."""

    op: str  # "gradq.mm" or "gradq.conv2d"
    role: str
    a_shape: str  # "197x64"
    b_shape: str
    dtype: str
    a_spec: str
    b_spec: str
    speedup: float


_MEASURED: dict[tuple, Measurement] = {}


def measurements() -> list[Measurement]:
    """Every signature measured in this process since the last `reset`, in order."""
    return list(_MEASURED.values())


def reset() -> None:
    """Forget the measurements: the next compile measures afresh (as a new process would)."""
    _MEASURED.clear()


def speedup(lowering: GemmLowering, target: Any, arguments: Mapping[str, Any]) -> float | None:
    """Float time / INT8 time of one gradq GEMM under `lowering`, or None where not measured.

    target: `torch.ops.gradq.mm.default` or `torch.ops.gradq.conv2d.default`; arguments: its
    arguments by name, tensors as (fake) tensors. Above 1: INT8 is faster. Measured on CUDA
    only, once per signature (module docstring).
    """
    a = arguments["a"]
    if a.device.type != "cuda" or not _concrete(arguments):
        return None
    # The module's name is no part of the signature: equal GEMMs of other layers share it.
    names = sorted(name for name in arguments if name != "module")
    key = (lowering.kind, str(target), *(_signature(arguments[name]) for name in names))
    if key not in _MEASURED:
        b = arguments["b"]
        _MEASURED[key] = Measurement(
            str(target.overloadpacket).removeprefix("torch.ops."),
            arguments["role"],
            "x".join(map(str, a.shape)),
            "x".join(map(str, b.shape)),
            str(a.dtype).removeprefix("torch."),
            arguments["a_spec"],
            arguments["b_spec"],
            measure(lowering, target, arguments),
        )
    return _MEASURED[key].speedup


def measure(lowering: GemmLowering, target: Any, arguments: Mapping[str, Any]) -> float:
    """`speedup` without its cache or its device check: time both paths on a's device."""
    with unset_fake_temporarily(), torch.no_grad():
        real = {name: _materialise(value) for name, value in arguments.items()}
        int8, floating = _paths(lowering, target, real)
        return _median_ms(floating, real["a"].device) / _median_ms(int8, real["a"].device)


def _paths(
    lowering: GemmLowering, target: Any, x: Mapping[str, Any]
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The INT8 path (`lowering`'s) and the float path of one GEMM, as calls on real tensors."""
    specs = (QuantSpec.decode(x["a_spec"]), QuantSpec.decode(x["b_spec"]))
    if target is torch.ops.gradq.mm.default:
        gemm = (x["a"], x["b"], x["bias"])
        return lambda: lowering.mm(*gemm, *specs), lambda: reference.float_mm(*gemm)
    if target is torch.ops.gradq.conv2d.default:
        geometry = tuple(tuple(x[name]) for name in ("stride", "padding", "size"))
        conv = (x["a"], x["b"], x["bias"], *geometry)
        return (
            lambda: lowering.conv2d(*conv, *specs, Role(x["role"])),
            lambda: reference.float_conv2d(*conv, x["role"]),
        )
    raise ValueError(f"fallback: target must be gradq.mm or gradq.conv2d, got {target}")


def _median_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds of `ITERS` calls of fn after `WARMUP` calls.

    CUDA events on CUDA (the host only queues the work); `time.perf_counter` elsewhere (tests
    time the CPU's reference paths).
    """
    for _ in range(WARMUP):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(ITERS):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    events = []
    for _ in range(ITERS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _concrete(arguments: Mapping[str, Any]) -> bool:
    for value in arguments.values():
        if isinstance(value, torch.Tensor):
            sizes = (*value.shape, *value.stride())
            if not all(isinstance(size, int) for size in sizes):
                return False
    return True


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.dtype, str(value.device))
    return tuple(value) if isinstance(value, list) else value


def _materialise(value: Any) -> Any:
    """A real tensor of a (fake) tensor's shape, strides, dtype and device; other values as is.

    Random normal values in a storage just large enough for the strides, so that transposed
    and expanded operands keep their layout (which the kernels' speed depends on).
    """
    if not isinstance(value, torch.Tensor):
        return value
    spans = zip(value.shape, value.stride(), strict=True)
    extent = 1 + sum((size - 1) * stride for size, stride in spans)
    extent = extent if value.numel() else 0
    storage = torch.randn(extent, device=value.device).to(value.dtype)
    return storage.as_strided(tuple(value.shape), value.stride())
