"""The reference lowering: gradq's numerics in plain torch (`gradq_fx.quantizer`).

Inductor compiles these ops like any others: on CUDA the integer GEMM goes to cuBLAS
`_int_mm` and Inductor fuses the quantize and dequantize around it; on the CPU it is the
default lowering. Every other lowering is tested against this one.

This module also holds what every lowering shares, because it is the reference's whatever
the lowering: the float GEMMs (a role the config keeps in float, a GEMM that fell back), fake
quantization (below 8 bits, IQS, LSQ operands: `run_mm` with specs) and the statistics of a
gradient used as it is (`exact_stats`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradq_fx import quantizer
from gradq_fx.config import Lowering, QuantSpec, Role, decode_operand
from gradq_fx.lowerings.base import GemmLowering


class Reference(GemmLowering):
    kind = Lowering.REFERENCE

    def quantize_rows(self, rows, spec, clip=None):
        """`quantizer.quantize` along the rows; clip: each row's clipping value where another
        kernel computed it (as `quantizer.quantize` takes it)."""
        q, scale = quantizer.quantize(rows, spec, dim=-1, clip=clip)
        return q, scale.expand(rows.shape[0], 1).reshape(-1)  # per_tensor: one scale, repeated

    def mm(self, a, b, bias, a_spec, b_spec):
        return quantizer.quantized_matmul(a, b, a_spec, b_spec, bias)

    def conv2d(self, a, b, bias, stride, padding, size, a_spec, b_spec, role):
        if role is Role.FORWARD:
            return quantizer.quantized_conv2d(a, b, bias, stride, padding, a_spec, b_spec)
        if role is Role.DGRAD:
            return quantizer.quantized_conv2d_input_grad(
                a, b, size, stride, padding, a_spec, b_spec
            )
        return quantizer.quantized_conv2d_weight_grad(a, b, size, stride, padding, a_spec, b_spec)

    def stats(self, x, spec, dim):
        return quantizer.quantization_stats(x, spec, dim)


REFERENCE = Reference()


def run_mm(a, b, bias, a_spec: str, b_spec: str) -> torch.Tensor:
    """What one `gradq.mm` computes with these encoded specs ("" = float), in a's dtype."""
    if not (a_spec and b_spec):
        return float_mm(a, b, bias)
    # decode_operand: None for an operand an LSQ quantizer quantized upstream.
    return quantizer.quantized_matmul(a, b, decode_operand(a_spec), decode_operand(b_spec), bias)


def run_conv2d(a, b, bias, stride, padding, size, a_spec: str, b_spec: str, role: str):
    """What one `gradq.conv2d` computes with these encoded specs ("" = float), in a's dtype."""
    stride, padding, size = tuple(stride), tuple(padding), tuple(size)
    if not (a_spec and b_spec):
        return float_conv2d(a, b, bias, stride, padding, size, role)
    a_spec_, b_spec_ = QuantSpec.decode(a_spec), QuantSpec.decode(b_spec)
    return REFERENCE.conv2d(a, b, bias, stride, padding, size, a_spec_, b_spec_, Role(role))


def float_mm(a, b, bias) -> torch.Tensor:
    """The GEMM gradq replaced, in the operands' dtype."""
    out = torch.matmul(a, b)
    return (out if bias is None else out + bias).to(a.dtype)


def float_conv2d(a, b, bias, stride, padding, size, role: str) -> torch.Tensor:
    """The convolution GEMM gradq replaced (by role, as `gradq.conv2d`), in a's dtype."""
    stride, padding, size = tuple(stride), tuple(padding), tuple(size)
    if role == Role.FORWARD.value:
        return F.conv2d(a, b, bias, stride, padding).to(a.dtype)
    if role == Role.DGRAD.value:
        shape = (a.shape[0], b.shape[1], *size)
        return torch.nn.grad.conv2d_input(shape, b, a, stride, padding).to(a.dtype)
    if role == Role.WGRAD.value:
        shape = (b.shape[1], a.shape[1], *size)
        return torch.nn.grad.conv2d_weight(a, shape, b, stride, padding).to(a.dtype)
    raise ValueError(f"gradq.conv2d: role must be forward, dgrad or wgrad, got {role!r}")


def run_stats(x: torch.Tensor, spec: str, dim: int) -> torch.Tensor:
    """What one `gradq.quantization_stats` computes (the reference's statistics)."""
    return REFERENCE.stats(x, QuantSpec.decode(spec), dim)


def exact_stats(x: torch.Tensor) -> torch.Tensor:
    """The statistics of a gradient used as it is (cosine 1, error 0, one step): a wgrad that
    fell back to float (`gradq_fx.fallback`) quantizes nothing."""
    one = x.new_ones((), dtype=torch.float32)
    return torch.stack([one, one * 0, one])
