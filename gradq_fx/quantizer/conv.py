"""A dense convolution (groups 1, dilation 1, any kernel, stride and padding) as three
implicit GEMMs, quantized.

out[n, o, p] = sum over (c, kh, kw) of W[o, c, kh, kw] * X[n, c, p + offset(kh, kw)]: a scale
factors out of the integer sum only if it is constant over what is summed, and the input's
window moves with p, so a scale of X may not vary across pixels. What each operand gets
where the config asks for `per_row` (with `per_tensor`, every operand is per tensor):

  forward  out = conv(X, W)      sums (c, kh, kw):  X per image n,  W per output channel o
  dgrad    dX  = conv^T(dY, W)   sums (o, kh, kw):  dY per image n, W per input channel c
  wgrad    dW  = corr(X, dY)     sums (n, h, w):    X per input channel c, dY per output
                                                    channel o (shifts keep the channel)

Per image is the finest valid grouping of X in forward and of dY in dgrad (one scale per
pixel, the GEMM's "row", would vary along the window): `conv2d_scale_groups` names these
groupings and the report shows them. The integer sums are exact (`kernels.int_mm`), then
dequantized by (left operand's scale) x (right operand's scale) in that order, as in
`quantized_matmul`. IQS or below 8 bits, a convolution is simulated (`is_fake_quantized`).
"""

from __future__ import annotations

import torch

from gradq_fx.config import Granularity, QuantSpec
from gradq_fx.kernels.int_mm import int8_conv2d, int8_conv2d_input_grad, int8_conv2d_weight_grad
from gradq_fx.quantizer.core import (
    from_slice_rows,
    is_fake_quantized,
    quantize,
    simulate,
    slice_rows,
)


def quantize_slices(
    x: torch.Tensor, spec: QuantSpec, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x with one scale per index of dimension `keep` (per_row; the slice is every
    other dimension) or one for the tensor (per_tensor).

    Returns q (int8, x's shape) and the scales, float32 [x.shape[keep]] (a per-tensor scale
    repeated). This is `quantize` of x viewed as rows [x.shape[keep], rest] (`slice_rows`).
    """
    q, scale = quantize(slice_rows(x, keep), spec, dim=-1)
    return from_slice_rows(q, x, keep), scale.expand(x.shape[keep], 1).reshape(-1)


def simulate_slices(x: torch.Tensor, spec: QuantSpec, keep: int) -> torch.Tensor:
    """What an implicit GEMM sees of x (float32), quantized as `quantize_slices` groups it."""
    return from_slice_rows(simulate(slice_rows(x, keep), spec, dim=-1), x, keep)


def conv2d_scale_groups(role: str, granularity: Granularity) -> tuple[str, str]:
    """What one scale of each operand of a convolution's `role` GEMM covers (module docstring):
    ('image', 'output channel') for the forward under per_row, ('tensor', 'tensor') per_tensor."""
    if granularity is Granularity.PER_TENSOR:
        return "tensor", "tensor"
    groups = {
        "forward": ("image", "output channel"),
        "dgrad": ("image", "input channel"),
        "wgrad": ("input channel", "output channel"),
    }
    if role not in groups:
        raise ValueError(f"conv2d_scale_groups: role must be one of {sorted(groups)}, got {role!r}")
    return groups[role]


def _outer_scales(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """float32(acc) [A, B, ...] times left [A] along dim 0, then right [B] along dim 1."""
    return acc.float() * left[:, None, None, None] * right[None, :, None, None]


def quantized_conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stride,
    padding,
    x_spec: QuantSpec,
    w_spec: QuantSpec,
) -> torch.Tensor:
    """F.conv2d(x, w, bias, stride, padding) with x [N, C, H, W] quantized per image and w
    [O, C, kh, kw] per output channel (or per tensor); output in x's dtype. IQS or below 8
    bits: simulated (`is_fake_quantized`), as `quantized_matmul` does."""
    if is_fake_quantized(x_spec, w_spec):
        x_sim, w_sim = simulate_slices(x, x_spec, 0), simulate_slices(w, w_spec, 0)
        out = torch.nn.functional.conv2d(x_sim, w_sim, None, stride, padding)
    else:
        x_q, x_scale = quantize_slices(x, x_spec, keep=0)
        w_q, w_scale = quantize_slices(w, w_spec, keep=0)
        out = _outer_scales(int8_conv2d(x_q, w_q, stride, padding), x_scale, w_scale)
    if bias is not None:
        out = out + bias.float()[:, None, None]
    return out.to(x.dtype)


def quantized_conv2d_input_grad(
    dy: torch.Tensor,
    w: torch.Tensor,
    input_size,
    stride,
    padding,
    dy_spec: QuantSpec,
    w_spec: QuantSpec,
) -> torch.Tensor:
    """The input gradient [N, C, *input_size] of conv2d from dY [N, O, H', W'] (per image) and
    w (per input channel), or per tensor; in dY's dtype. Simulated as in `quantized_conv2d`."""
    if is_fake_quantized(dy_spec, w_spec):
        dy_sim, w_sim = simulate_slices(dy, dy_spec, 0), simulate_slices(w, w_spec, 1)
        shape = (dy.shape[0], w.shape[1], *input_size)
        out = torch.nn.grad.conv2d_input(shape, w_sim, dy_sim, stride, padding)
    else:
        dy_q, dy_scale = quantize_slices(dy, dy_spec, keep=0)
        w_q, w_scale = quantize_slices(w, w_spec, keep=1)
        acc = int8_conv2d_input_grad(dy_q, w_q, stride, padding, input_size)
        out = _outer_scales(acc, dy_scale, w_scale)
    return out.to(dy.dtype)


def quantized_conv2d_weight_grad(
    x: torch.Tensor,
    dy: torch.Tensor,
    kernel_size,
    stride,
    padding,
    x_spec: QuantSpec,
    dy_spec: QuantSpec,
) -> torch.Tensor:
    """The weight gradient [O, C, *kernel_size] of conv2d from x (per input channel) and dY
    (per output channel), or per tensor; in x's dtype. Simulated as in `quantized_conv2d`."""
    if is_fake_quantized(x_spec, dy_spec):
        x_sim, dy_sim = simulate_slices(x, x_spec, 1), simulate_slices(dy, dy_spec, 1)
        shape = (dy.shape[1], x.shape[1], *kernel_size)
        out = torch.nn.grad.conv2d_weight(x_sim, shape, dy_sim, stride, padding)
    else:
        x_q, x_scale = quantize_slices(x, x_spec, keep=1)
        dy_q, dy_scale = quantize_slices(dy, dy_spec, keep=1)
        acc = int8_conv2d_weight_grad(x_q, dy_q, stride, padding, kernel_size)
        out = _outer_scales(acc, dy_scale, x_scale)
    return out.to(x.dtype)
