"""What the kernel benchmark times: the distinct shapes of a model's linear layers, the forward,
dgrad and wgrad GEMM of each (`GemmProblem`, operands in training's layouts, pre-quantized),
the GEMM candidates that compute them (`KERNEL_CANDIDATES`) with the check each must pass
before it is timed, the per-row quantize candidates (`QUANTIZE_CANDIDATES`) and the gradient's
IQR clip candidates (`CLIP_CANDIDATES`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradq_fx.config import Clipping, QuantSpec
from gradq_fx.kernels.int_mm import CUBLAS_MIN_ROWS, CUBLAS_MULTIPLE, int8_gemm, padded_int_mm
from gradq_fx.kernels.iqr import iqr_clip_rows
from gradq_fx.quantizer import clip_value, quantize, quantized_matmul, sqnr_db

# Shapes and GEMM problems.


@dataclasses.dataclass(frozen=True)
class LinearShape:
    """The linear layers of one (tokens, in, out) shape: module paths with block indices as *."""

    layers: str
    count: int
    tokens: int  # M: rows of the input, all leading dimensions together
    in_features: int  # K
    out_features: int  # N


def _pattern(path: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def linear_shapes(model: torch.nn.Module, batch_size: int, size: int) -> list[LinearShape]:
    """The distinct shapes of the model's nn.Linear layers at this batch, from one forward pass
    with hooks (on the meta device when the model is there: no memory, no compute)."""
    device = next(model.parameters()).device
    seen: dict[tuple[int, int, int], list[str]] = {}

    def record(path: str):
        def hook(module, inputs, _output):
            tokens = math.prod(inputs[0].shape[:-1])
            key = (tokens, module.in_features, module.out_features)
            seen.setdefault(key, []).append(_pattern(path))

        return hook

    handles = [
        module.register_forward_hook(record(path))
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        with torch.no_grad():
            model(torch.empty(batch_size, 3, size, size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return [
        LinearShape(", ".join(dict.fromkeys(paths)), len(paths), *key)
        for key, paths in seen.items()
    ]


ROLES = ("forward", "dgrad", "wgrad")
# Both GEMM operands are quantized per row along the contracted dimension, minmax, 8 bits:
# the activation's spec; the GEMM's cost and numerics do not depend on how scales were chosen.
GEMM_SPEC = QuantSpec()


@dataclasses.dataclass(frozen=True)
class GemmProblem:
    """One GEMM a[m,k] @ b[k,n] of a linear layer's role, with the operands every candidate
    needs: float (in the layout training has: wgrad's a is dY^T, a transposed view) and
    pre-quantized (`GEMM_SPEC`; q_a row-major, q_b column-major, as cuBLAS wants them)."""

    layers: str
    role: str
    a: torch.Tensor
    b: torch.Tensor
    q_a: torch.Tensor
    scale_a: torch.Tensor  # float32 [m, 1]
    q_b: torch.Tensor
    scale_b: torch.Tensor  # float32 [1, n]

    @property
    def mkn(self) -> tuple[int, int, int]:
        return self.a.shape[0], self.a.shape[1], self.b.shape[1]


def gemm_problems(
    shape: LinearShape, max_tokens: int | None, device: torch.device, seed: int
) -> list[GemmProblem]:
    """The forward, dgrad and wgrad GEMMs of one linear shape, with random bf16 operands."""
    tokens = min(shape.tokens, max_tokens) if max_tokens else shape.tokens
    k, n = shape.in_features, shape.out_features
    generator = torch.Generator().manual_seed(seed)

    def random(*size: int, std: float) -> torch.Tensor:
        values = torch.randn(*size, generator=generator) * std
        return values.to(device=device, dtype=torch.bfloat16)

    x, weight, grad = (
        random(tokens, k, std=1.0),
        random(n, k, std=0.02),
        random(tokens, n, std=1e-3),
    )
    operands = {"forward": (x, weight.t()), "dgrad": (grad, weight), "wgrad": (grad.t(), x)}
    problems = []
    for role in ROLES:
        a, b = operands[role]
        q_a, scale_a = quantize(a, GEMM_SPEC, dim=-1)
        q_b, scale_b = quantize(b, GEMM_SPEC, dim=-2)
        q_b = q_b.t().contiguous().t()
        problems.append(
            GemmProblem(shape.layers, role, a, b, q_a.contiguous(), scale_a, q_b, scale_b)
        )
    return problems


# GEMM candidates.


@dataclasses.dataclass(frozen=True)
class KernelCandidate:
    """A way to compute a GemmProblem's product.

    `prepare(problem)` returns a call that computes it (a [m, n] tensor in a's dtype), or None
    when the candidate cannot run here (its kernel is missing); the benchmark checks the call's
    result, then times the call. `precision` picks the reference and the peak it is measured
    against: "bf16" (float operands; at least `BF16_MIN_SQNR_DB` against a float32 GEMM) or
    "int8" (the quantized operands; equal, bit for bit, to `quantized_matmul`).
    """

    prepare: Callable[[GemmProblem], Callable[[], torch.Tensor] | None]
    precision: str
    description: str


BF16_MIN_SQNR_DB = 40.0


def bf16_candidate(problem: GemmProblem) -> Callable[[], torch.Tensor]:
    a, b = problem.a, problem.b
    return lambda: torch.mm(a, b)


def int_mm_function(q_a: torch.Tensor, q_b: torch.Tensor) -> Callable:
    """torch._int_mm on CUDA (padded where cuBLAS refuses the shape); on the CPU gradq's exact
    int8 GEMM (float32 over K-chunks; _int_mm there is 20-50x slower)."""
    if not q_a.is_cuda:
        return int8_gemm
    (m, k), n = q_a.shape, q_b.shape[1]
    legal = m >= CUBLAS_MIN_ROWS and k % CUBLAS_MULTIPLE == 0 and n % CUBLAS_MULTIPLE == 0
    return torch._int_mm if legal else padded_int_mm


def int_mm_candidate(problem: GemmProblem) -> Callable[[], torch.Tensor]:
    q_a, q_b, scale_a, scale_b = problem.q_a, problem.q_b, problem.scale_a, problem.scale_b
    mm, dtype = int_mm_function(q_a, q_b), problem.a.dtype
    return lambda: (mm(q_a, q_b).float() * scale_a * scale_b).to(dtype)


def gradq_gemm_candidate(problem: GemmProblem) -> Callable[[], torch.Tensor] | None:
    """THE SLOT for gradq's own fused INT8 GEMM: `torch.ops.gradq.int8_scaled_mm(a,
    b, row_scale [M], col_scale [N], bias, out_dtype)`, the dequantize in its epilogue. Skipped
    while no such op is registered; change the call here if the op's signature changes."""
    ops = torch.ops.gradq
    if not hasattr(ops, "int8_scaled_mm"):
        return None
    q_a, q_b, dtype = problem.q_a, problem.q_b, problem.a.dtype
    row_scale, col_scale = problem.scale_a.reshape(-1), problem.scale_b.reshape(-1)
    return lambda: ops.int8_scaled_mm(q_a, q_b, row_scale, col_scale, None, dtype)


KERNEL_CANDIDATES: dict[str, KernelCandidate] = {
    "bf16": KernelCandidate(bf16_candidate, "bf16", "torch.mm in bf16 (cuBLAS on CUDA)"),
    "int_mm": KernelCandidate(
        int_mm_candidate,
        "int8",
        "torch._int_mm (CPU: gradq's exact float32-chunked int8 GEMM) + float dequantize",
    ),
    "gradq": KernelCandidate(
        gradq_gemm_candidate, "int8", "torch.ops.gradq.int8_scaled_mm (dequantize in epilogue)"
    ),
}


def parse_candidates(text: str) -> tuple[str, ...]:
    """'int_mm,bf16' -> those GEMM candidates in registry order; ValueError on bad names."""
    return check_candidates([name.strip() for name in text.split(",") if name.strip()])


def check_candidates(names: Sequence[str]) -> tuple[str, ...]:
    """The GEMM candidates `names` in registry order; ValueError naming --candidates."""
    valid = ", ".join(KERNEL_CANDIDATES)
    unknown = [name for name in names if name not in KERNEL_CANDIDATES]
    if not names or unknown:
        raise ValueError(f"--candidates: unknown or no candidates {unknown} (valid: {valid})")
    return tuple(name for name in KERNEL_CANDIDATES if name in names)


def check_result(candidate: KernelCandidate, problem: GemmProblem, out: torch.Tensor) -> None:
    """Raise AssertionError unless `out` is the candidate's reference result for `problem`."""
    m, _, n = problem.mkn
    if out.shape != (m, n) or out.dtype != problem.a.dtype:
        raise AssertionError(f"got {out.dtype} {tuple(out.shape)}, want {problem.a.dtype} {(m, n)}")
    if candidate.precision == "int8":
        reference = quantized_matmul(problem.a, problem.b, GEMM_SPEC, GEMM_SPEC)
        if not torch.equal(out, reference):
            wrong = (out != reference).sum().item()
            raise AssertionError(f"{wrong} of {out.numel()} values differ from quantized_matmul")
    else:
        sqnr = sqnr_db(problem.a.float() @ problem.b.float(), out)
        if not sqnr >= BF16_MIN_SQNR_DB:
            raise AssertionError(f"SQNR {sqnr:.1f} dB against float32 < {BF16_MIN_SQNR_DB} dB")


def _quantize_torch(x: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    return lambda: quantize(x, GEMM_SPEC, dim=-1)


def gradq_quantize_candidate(x: torch.Tensor) -> Callable[[], Any] | None:
    """The slot for gradq's quantize kernel, `torch.ops.gradq.quantize_rows(x)` (per-row
    minmax, 8 bits, nearest): skipped while no such op is registered."""
    ops = torch.ops.gradq
    if not hasattr(ops, "quantize_rows"):
        return None
    return lambda: ops.quantize_rows(x)


# The gradient's clip: `iqr` clipping (the default for gradients), 8 bits, one value per row.
CLIP_SPEC = QuantSpec(clipping=Clipping.IQR)


def _clip_compiled(g: torch.Tensor) -> Callable[[], torch.Tensor]:
    """`clip_value` compiled by Inductor, as the reference lowering runs it."""
    compiled = torch.compile(clip_value, dynamic=False)
    return lambda: compiled(g.float(), CLIP_SPEC)


# IQR clip candidates: the gradient rows g [R, C] -> a call returning the clips [R]. Each must
# pick the candidate `clip_value` (eager) picks in nearly every row (`kernels/iqr.py`).
CLIP_CANDIDATES: dict[str, Callable[[torch.Tensor], Callable[[], torch.Tensor]]] = {
    "torch": lambda g: lambda: clip_value(g.float(), CLIP_SPEC),
    "torch.compile": _clip_compiled,
    "gradq": lambda g: lambda: iqr_clip_rows(g, CLIP_SPEC.bits),
}

# Quantize candidates: x [M, K] -> a call returning (q int8 [M, K], scales), or None to skip.
# Each must equal `quantize(x, GEMM_SPEC, dim=-1)` (scales compared flattened).
QUANTIZE_CANDIDATES: dict[str, Callable[[torch.Tensor], Callable[[], Any] | None]] = {
    "torch": _quantize_torch,
    "gradq": gradq_quantize_candidate,
}
