"""The operators gradq puts into a model's graph: their schemas, fake (meta) functions and
eager implementations (the reference lowering's).

- `torch.ops.gradq.mm`: one GEMM of a known role (forward / dgrad / wgrad), operand kinds and
  module, the quantization of each operand spelled out as a `QuantSpec.encode()` string
  ("" = float). Opaque to AOTAutograd, so the joint graph holds one such node per GEMM of the
  training step, labelled; `gradq_fx.plan` plans each and `gradq_fx.passes.lower` replaces it
  by what its plan's lowering computes (`gradq_fx.lowerings`).
- `torch.ops.gradq.conv2d`: the same for one GEMM of a dense convolution (an implicit GEMM:
  groups 1, dilation 1, any kernel, stride and padding).
- `torch.ops.gradq.quantization_stats`: a layer's gradient statistics (`gradq_fx.stats`) as
  one backward node.
- `torch.ops.gradq.lsq_fake_quantize`: LSQ fake quantization (`quantizer.lsq_forward`, with
  `quantizer.lsq_backward` as its autograd formula) as one opaque node, so that gradq's
  annotate pass can see that a GEMM operand is already quantized by a learnable quantizer.

`operands` names what a GEMM's two operands are, a letter each: "W" a weight, "A" an
activation, "G" a gradient ("AW" for a Linear's forward, "GW" its dgrad, "AG" its wgrad).
The autograd functions that emit these ops are in `gradq_fx.targets`.
"""

from __future__ import annotations

import torch

from gradq_fx import quantizer
from gradq_fx.config import Operand, Role
from gradq_fx.lowerings import reference

OPERAND_KINDS = frozenset(operand.value for operand in Operand)


@torch.library.custom_op("gradq::mm", mutates_args=())
def mm_op(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    a_spec: str,
    b_spec: str,
    role: str,
    operands: str,
    module: str,
) -> torch.Tensor:
    """a [..., M, K] @ b [..., K, N] (+ bias [N]); quantized when both specs are non-empty."""
    _check_labels(role, operands)
    return reference.run_mm(a, b, bias, a_spec, b_spec)


@mm_op.register_fake
def _(a, b, bias, a_spec, b_spec, role, operands, module):
    _check_labels(role, operands)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.new_empty((*batch, a.shape[-2], b.shape[-1]))


@torch.library.custom_op("gradq::conv2d", mutates_args=())
def conv2d_op(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    size: list[int],
    a_spec: str,
    b_spec: str,
    role: str,
    operands: str,
    module: str,
) -> torch.Tensor:
    """One GEMM of a dense convolution (groups 1, dilation 1); quantized when both specs are
    non-empty. By role, with x [N, C, H, W], w [O, C, kh, kw], dy [N, O, H', W']:
      forward  a = x,  b = w,  bias [O] or None  ->  y  [N, O, H', W'], size = (H', W')
      dgrad    a = dy, b = w                     ->  dx [N, C, H, W],   size = (H, W)
      wgrad    a = x,  b = dy                    ->  dw [O, C, kh, kw], size = (kh, kw)
    """
    _check_labels(role, operands)
    return reference.run_conv2d(a, b, bias, stride, padding, size, a_spec, b_spec, role)


@conv2d_op.register_fake
def _(a, b, bias, stride, padding, size, a_spec, b_spec, role, operands, module):
    _check_labels(role, operands)
    shapes = {
        Role.FORWARD.value: (a.shape[0], b.shape[0]),
        Role.DGRAD.value: (a.shape[0], b.shape[1]),
        Role.WGRAD.value: (b.shape[1], a.shape[1]),
    }
    return a.new_empty((*shapes[role], *size))


def _check_labels(role: str, operands: str) -> None:
    roles = [r.value for r in Role]
    if role not in roles:
        raise ValueError(f"gradq GEMM: role must be one of {roles}, got {role!r}")
    if len(operands) != 2 or not set(operands) <= OPERAND_KINDS:
        raise ValueError(f"gradq GEMM: operands must be two of 'W', 'A', 'G', got {operands!r}")


@torch.library.custom_op("gradq::quantization_stats", mutates_args=())
def stats_op(x: torch.Tensor, spec: str, dim: int, module: str) -> torch.Tensor:
    """`quantizer.quantization_stats` (float32 [3]) of `module`'s wgrad gradient x as one node
    of the backward graph; its plan (`gradq_fx.plan.StatsPlan`) says how it is lowered."""
    return reference.run_stats(x, spec, dim)


@stats_op.register_fake
def _(x, spec, dim, module):
    return x.new_empty((3,), dtype=torch.float32)


@torch.library.custom_op("gradq::lsq_fake_quantize", mutates_args=())
def lsq_op(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    grad_scale: torch.Tensor,
    low: int,
    high: int,
) -> torch.Tensor:
    """`quantizer.lsq_forward`; its gradient is `quantizer.lsq_backward`'s (LSQ's)."""
    return quantizer.lsq_forward(x, scale, offset, low, high)


@lsq_op.register_fake
def _(x, scale, offset, grad_scale, low, high):
    return torch.empty_like(x)


def _lsq_setup_context(ctx, inputs, output):
    x, scale, offset, grad_scale, low, high = inputs
    ctx.save_for_backward(x, scale, offset, grad_scale)
    ctx.bounds = (low, high)


def _lsq_backward(ctx, grad_output):
    x, scale, offset, grad_scale = ctx.saved_tensors
    grads = quantizer.lsq_backward(grad_output, x, scale, offset, *ctx.bounds, grad_scale)
    return *grads, None, None, None


lsq_op.register_autograd(_lsq_backward, setup_context=_lsq_setup_context)


def lsq_node(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None = None,
    *,
    bits: int,
    signed: bool = True,
    grad_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """`quantizer.lsq_fake_quantize` (same arguments, same numbers) as one graph node."""
    low, high, grad_scale = quantizer.lsq_arguments(scale, offset, bits, signed, grad_scale)
    return torch.ops.gradq.lsq_fake_quantize.default(x, scale, offset, grad_scale, low, high)


def range_bits(low: int, high: int) -> int:
    """The bit width of an integer range low..high of 2^bits codes (an LSQ quantizer's)."""
    return (high - low).bit_length()
