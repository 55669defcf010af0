"""The operators gradq's rewrite puts into a model's graph.

`torch.ops.gradq.mm` is one GEMM of a known role (forward / dgrad / wgrad) and module, with
the quantization of each operand spelled out as a `QuantSpec.encode()` string ("" = float).
It is opaque to AOTAutograd, so the joint graph holds one such node per GEMM of the training
step, labelled; the joint-graph pass `gradq_fx.passes.lower` then replaces each by
`mm_reference` (the numerics of `gradq_fx.quantizer.quantized_matmul`) or `mm_triton` (the
same numerics through gradq's kernels: all of them, or the GEMM alone with the quantize left
to Inductor) for Inductor to compile.

`torch.ops.gradq.conv2d` is the same for one GEMM of a dense convolution (an implicit GEMM:
groups 1, dilation 1, any kernel, stride and padding), lowered to `conv_reference` (the numerics
of `gradq_fx.quantizer.quantized_conv2d` and its two gradients) or `conv_triton`.

`torch.ops.gradq.quantization_stats` is a layer's gradient statistics (`gradq_fx.stats`) as
one backward node, lowered to `stats_reference` or `stats_triton` the same way.

`quantized_linear`, `quantized_matmul` and `quantized_conv2d` are what the Dynamo-level
rewrite calls in place of `F.linear`, `torch.matmul` and `F.conv2d`: autograd functions whose
forward and backward are `gradq.mm`s (or `gradq.conv2d`s).

`torch.ops.gradq.lsq_fake_quantize` is LSQ fake quantization (`quantizer.lsq_forward`, with
`quantizer.lsq_backward` as its autograd formula) as one opaque node, so that gradq's
annotate pass can see that a GEMM operand is already quantized by a learnable quantizer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from gradq_fx import quantizer
from gradq_fx.config import Clipping, Granularity, QuantSpec, Role, Rounding, decode_operand
from gradq_fx.kernels import conv as conv_kernel
from gradq_fx.kernels import gemm
from gradq_fx.kernels import iqr as iqr_kernel
from gradq_fx.kernels import quantize as quantize_kernel
from gradq_fx.kernels.int_mm import conv2d_output_size, input_grad_operands, int8_patches


@torch.library.custom_op("gradq::mm", mutates_args=())
def gradq_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    a_spec: str,
    b_spec: str,
    role: str,
    module: str,
) -> torch.Tensor:
    """a [..., M, K] @ b [..., K, N] (+ bias [N]); quantized when both specs are non-empty."""
    return mm_reference(a, b, bias, a_spec, b_spec)


@gradq_mm.register_fake
def _(a, b, bias, a_spec, b_spec, role, module):
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.new_empty((*batch, a.shape[-2], b.shape[-1]))


def mm_reference(a, b, bias, a_spec: str, b_spec: str) -> torch.Tensor:
    """What one `gradq.mm` computes, in plain torch (traceable); the result has a's dtype."""
    if a_spec and b_spec:
        return quantizer.quantized_matmul(
            a, b, decode_operand(a_spec), decode_operand(b_spec), bias
        )
    out = torch.matmul(a, b)
    return (out if bias is None else out + bias).to(a.dtype)


@torch.library.custom_op("gradq::lsq_fake_quantize", mutates_args=())
def lsq_fake_quantize_op(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    grad_scale: torch.Tensor,
    low: int,
    high: int,
) -> torch.Tensor:
    """`quantizer.lsq_forward`; its gradient is `quantizer.lsq_backward`'s (LSQ's)."""
    return quantizer.lsq_forward(x, scale, offset, low, high)


@lsq_fake_quantize_op.register_fake
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


lsq_fake_quantize_op.register_autograd(_lsq_backward, setup_context=_lsq_setup_context)


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None = None,
    *,
    bits: int,
    signed: bool = True,
    grad_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """`quantizer.lsq_fake_quantize` (same arguments, same numbers) as the custom op."""
    low, high, grad_scale = quantizer.lsq_arguments(scale, offset, bits, signed, grad_scale)
    return torch.ops.gradq.lsq_fake_quantize.default(x, scale, offset, grad_scale, low, high)


def lsq_bits(low: int, high: int) -> int:
    """The bit width of an LSQ quantizer from its integer range (high - low + 1 = 2^bits)."""
    return (high - low).bit_length()


def _quantize_rows(
    rows: torch.Tensor, spec: QuantSpec, fused: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantizer.quantize(rows, spec, dim=-1)` for 2-D rows -> (int8 [R, C], scale [R]).

    The clipping value: per-row iqr's comes from its own kernel (`kernels/iqr.py`, one
    program per row, no [rows, 640] histogram in memory). Then, with `fused`, the quantizer's
    plain torch ops, which Inductor fuses into the kernel that produced `rows`; else the
    quantize kernel (one opaque launch; it takes per-row minmax's absmax itself, and the other
    clips from `quantizer.clip_value`).
    """
    per_row = spec.granularity is Granularity.PER_ROW
    clip = None
    if per_row and spec.clipping is Clipping.IQR:
        clip = iqr_kernel.iqr_clip_rows(rows, spec.bits)
    if fused:
        q, scale = quantizer.quantize(rows, spec, dim=-1, clip=clip)
        return q, scale.expand(rows.shape[0], 1).reshape(-1)  # per_tensor: repeated, as below
    if clip is None and not (per_row and spec.clipping is Clipping.MINMAX):
        flat = rows.float() if per_row else rows.float().reshape(1, -1)
        clip = quantizer.clip_value(flat, spec)
        clip = clip if per_row else clip.reshape(())
    stochastic = spec.rounding is Rounding.STOCHASTIC
    seed = None
    if stochastic:  # fresh random bits for every call, as torch.rand_like gives the reference
        seed = torch.randint(2**31 - 1, (1,), device=rows.device, dtype=torch.int64)
    return quantize_kernel.quantize_rows(rows, clip, spec.bits, stochastic, seed, spec.scaling)


@torch.library.custom_op("gradq::quantization_stats", mutates_args=())
def quantization_stats(x: torch.Tensor, spec: str, dim: int, module: str) -> torch.Tensor:
    """`quantizer.quantization_stats` (float32 [3]) of `module`'s wgrad gradient x as one node
    of the backward graph, which the lowering pass turns into `stats_reference`, for the
    kernel lowerings `stats_triton`, or `stats_exact` where that wgrad falls back to float."""
    return stats_reference(x, spec, dim)


@quantization_stats.register_fake
def _(x, spec, dim, module):
    return x.new_empty((3,), dtype=torch.float32)


def stats_exact(x: torch.Tensor, spec: str, dim: int) -> torch.Tensor:
    """The statistics of a gradient used as it is (cosine 1, error 0): a wgrad GEMM that
    fell back to float (`gradq_fx.fallback`) quantizes nothing."""
    one = x.new_ones((), dtype=torch.float32)
    return torch.stack([one, one * 0, one])


def stats_reference(x: torch.Tensor, spec: str, dim: int) -> torch.Tensor:
    return quantizer.quantization_stats(x, QuantSpec.decode(spec), dim)


def stats_triton(x: torch.Tensor, spec: str, dim: int) -> torch.Tensor:
    """`stats_reference`, per-row iqr clips from `kernels/iqr.py` (the rest plain torch, for
    Inductor to fuse into one reduction): the reference IQR's [rows, 640] histogram and
    [rows, 8, C] candidate scoring would otherwise run again, beside the wgrad's own clip.
    The clip's input is the wgrad's (dY^T's rows), so the partitioner's CSE keeps one call
    for both (tests/test_stats.py)."""
    spec_ = QuantSpec.decode(spec)
    clip = None
    if spec_.granularity is Granularity.PER_ROW and spec_.clipping is Clipping.IQR:
        clip = iqr_kernel.iqr_clip_rows(quantizer.as_rows(x, dim, per_row=True), spec_.bits)
    return quantizer.quantization_stats(x, spec_, dim, clip)


def mm_triton(a, b, bias, a_spec: str, b_spec: str, fused: bool = False) -> torch.Tensor:
    """`mm_reference` of two quantized operands through gradq's kernels.

    Each operand is quantized along the contracted dimension (rows of a, rows of b^T): in one
    kernel pass, or with `fused` by Inductor's code (`_quantize_rows`); one GEMM applies both
    scales and the bias in its epilogue. Nearest rounding gives mm_reference's numbers
    (unscaled: bit for bit; least-squares scales: to float rounding of their sums; iqr clips:
    to float rounding, see `kernels/iqr.py`); stochastic rounding draws other random bits.
    """
    a_spec_, b_spec_ = QuantSpec.decode(a_spec), QuantSpec.decode(b_spec)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    q_a, scale_a = _quantize_rows(a.reshape(-1, k), a_spec_, fused)
    q_bt, scale_b = _quantize_rows(b.mT.reshape(-1, k), b_spec_, fused)  # b^T's rows
    if a.dim() == 2:
        return gemm.int8_scaled_mm(q_a, q_bt.t(), scale_a, scale_b, bias, a.dtype)
    batch = a.shape[:-2]  # equal to b's: `_matmul` expands both
    out = gemm.int8_scaled_bmm(
        q_a.view(-1, m, k),
        q_bt.view(-1, n, k).mT,
        scale_a.view(-1, m),
        scale_b.view(-1, n),
        bias,
        a.dtype,
    )
    return out.view(*batch, m, n)


# --------------------------------------------------------------------------- gradq.conv2d


@torch.library.custom_op("gradq::conv2d", mutates_args=())
def gradq_conv2d(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    size: list[int],
    a_spec: str,
    b_spec: str,
    role: str,
    module: str,
) -> torch.Tensor:
    """One GEMM of a dense convolution (groups 1, dilation 1); quantized when both specs are
    non-empty. By role, with x [N, C, H, W], w [O, C, kh, kw], dy [N, O, H', W']:
      forward  a = x,  b = w,  bias [O] or None  ->  y  [N, O, H', W'], size = (H', W')
      dgrad    a = dy, b = w                     ->  dx [N, C, H, W],   size = (H, W)
      wgrad    a = x,  b = dy                    ->  dw [O, C, kh, kw], size = (kh, kw)
    """
    return conv_reference(a, b, bias, stride, padding, size, a_spec, b_spec, role)


@gradq_conv2d.register_fake
def _(a, b, bias, stride, padding, size, a_spec, b_spec, role, module):
    shapes = {
        Role.FORWARD.value: (a.shape[0], b.shape[0]),
        Role.DGRAD.value: (a.shape[0], b.shape[1]),
        Role.WGRAD.value: (b.shape[1], a.shape[1]),
    }
    if role not in shapes:
        raise ValueError(f"gradq.conv2d: role must be one of {sorted(shapes)}, got {role!r}")
    return a.new_empty((*shapes[role], *size))


def conv_reference(
    a, b, bias, stride, padding, size, a_spec: str, b_spec: str, role: str
) -> torch.Tensor:
    """What one `gradq.conv2d` computes, in plain torch (traceable); the result has a's dtype."""
    stride, padding, size = tuple(stride), tuple(padding), tuple(size)
    quantized = bool(a_spec and b_spec)
    if quantized:
        a_spec_, b_spec_ = QuantSpec.decode(a_spec), QuantSpec.decode(b_spec)
    if role == Role.FORWARD.value:
        if quantized:
            return quantizer.quantized_conv2d(a, b, bias, stride, padding, a_spec_, b_spec_)
        return F.conv2d(a, b, bias, stride, padding).to(a.dtype)
    if role == Role.DGRAD.value:
        if quantized:
            return quantizer.quantized_conv2d_input_grad(
                a, b, size, stride, padding, a_spec_, b_spec_
            )
        shape = (a.shape[0], b.shape[1], *size)
        return torch.nn.grad.conv2d_input(shape, b, a, stride, padding).to(a.dtype)
    if role == Role.WGRAD.value:
        if quantized:
            return quantizer.quantized_conv2d_weight_grad(
                a, b, size, stride, padding, a_spec_, b_spec_
            )
        shape = (b.shape[1], a.shape[1], *size)
        return torch.nn.grad.conv2d_weight(a, shape, b, stride, padding).to(a.dtype)
    raise ValueError(f"gradq.conv2d: role must be forward, dgrad or wgrad, got {role!r}")


def _quantize_slices(x: torch.Tensor, spec: QuantSpec, keep: int, fused: bool):
    """`quantizer.quantize_slices` as `_quantize_rows` does it: rows [x.shape[keep], rest]."""
    moved = x.movedim(keep, 0)
    q, scale = _quantize_rows(moved.reshape(x.shape[keep], -1), spec, fused)
    return q.reshape(moved.shape).movedim(0, keep), scale


def conv_triton(
    a, b, bias, stride, padding, size, a_spec: str, b_spec: str, role: str, fused: bool = False
) -> torch.Tensor:
    """`conv_reference` of two quantized operands through gradq's kernels, the operands
    quantized as `quantizer`'s convolution section says (per image / per channel), by the
    quantize kernel or with `fused` by Inductor's code (`_quantize_rows`):
    - forward: the implicit-GEMM kernel (`kernels/conv.py`), scales and bias in its epilogue;
    - dgrad: the same kernel, stride 1, on dY with zeros inserted and padded
      (`int_mm.input_grad_operands`): exact, but at stride s it multiplies s^2 times as many
      (mostly zero) values as needed;
    - wgrad: dY as [O, N H' W'] times the input's int8 patches [N H' W', C kh kw] (an
      explicit im2col copy, kh kw / s^2 times the input's size) in the scaled GEMM kernel.
    Numbers as `mm_triton`'s: nearest rounding matches the reference bit for bit (unscaled)
    or to float rounding of the least-squares sums.
    """
    stride, padding, size = tuple(stride), tuple(padding), tuple(size)
    a_spec_, b_spec_ = QuantSpec.decode(a_spec), QuantSpec.decode(b_spec)
    if role == Role.FORWARD.value:
        q_x, x_scale = _quantize_slices(a, a_spec_, keep=0, fused=fused)
        q_w, w_scale = _quantize_slices(b, b_spec_, keep=0, fused=fused)
        return conv_kernel.int8_scaled_conv2d(
            q_x, q_w, x_scale, w_scale, stride, padding, bias, a.dtype
        )
    if role == Role.DGRAD.value:
        q_dy, dy_scale = _quantize_slices(a, a_spec_, keep=0, fused=fused)
        q_w, w_scale = _quantize_slices(b, b_spec_, keep=1, fused=fused)
        z, flipped = input_grad_operands(q_dy, q_w, stride, padding, size)
        return conv_kernel.int8_scaled_conv2d(
            z, flipped, dy_scale, w_scale, (1, 1), (0, 0), None, a.dtype
        )
    if role == Role.WGRAD.value:
        q_x, x_scale = _quantize_slices(a, a_spec_, keep=1, fused=fused)
        q_dy, dy_scale = _quantize_slices(b, b_spec_, keep=1, fused=fused)
        out_channels, channels = b.shape[1], a.shape[1]
        rows = q_dy.transpose(0, 1).reshape(out_channels, -1)
        patches = int8_patches(q_x, size, stride, padding)
        col_scale = x_scale.repeat_interleave(size[0] * size[1])  # columns are (c, kh, kw)
        out = gemm.int8_scaled_mm(rows, patches, dy_scale, col_scale, None, a.dtype)
        return out.reshape(out_channels, channels, *size)
    raise ValueError(f"gradq.conv2d: role must be forward, dgrad or wgrad, got {role!r}")


class GemmSite(NamedTuple):
    """The three GEMMs of one rewritten matmul: each role's operand specs ("" = float).

    Strings and tuples only: the Dynamo graph stores it as a node argument, and FX writes
    node arguments into generated Python source (where it arrives as a plain tuple).
    """

    module: str
    forward: tuple[str, str]
    dgrad_a: tuple[str, str]  # grad of the left operand  = grad_out @ b^T
    dgrad_b: tuple[str, str]  # grad of the right operand = a^T @ grad_out
    role_b: str  # "wgrad" when the right operand is a weight, else "dgrad"


def _mm(a, b, bias, specs: tuple[str, str], role: str, module: str) -> torch.Tensor:
    return torch.ops.gradq.mm(a, b, bias, specs[0], specs[1], role, module)


class _QuantizedMatmul(torch.autograd.Function):
    """out = a @ b (+ bias), with a [..., M, K], b [..., K, N] of equal batch dims."""

    @staticmethod
    def forward(ctx, a, b, bias, site: GemmSite, probe):
        ctx.save_for_backward(a, b)
        ctx.site = site = GemmSite(*site)
        ctx.has_bias = bias is not None
        ctx.has_probe = probe is not None
        return _mm(a, b, bias, site.forward, Role.FORWARD.value, site.module)

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        site = ctx.site
        grad_a = grad_b = grad_bias = grad_probe = None
        if ctx.needs_input_grad[0]:
            grad_a = _mm(grad_out, b.mT, None, site.dgrad_a, Role.DGRAD.value, site.module)
        if ctx.needs_input_grad[1]:
            grad_b = _mm(a.mT, grad_out, None, site.dgrad_b, site.role_b, site.module)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        if ctx.has_probe and ctx.needs_input_grad[4]:
            # The probe's "gradient" is the statistics of dY's quantization in wgrad: it
            # reaches probe.grad on the device, with no host synchronisation.
            grad_probe = torch.ops.gradq.quantization_stats(
                grad_out, site.dgrad_b[1], -2, site.module
            )
        return grad_a, grad_b, grad_bias, None, grad_probe


def _autocast(*tensors):
    """Apply autocast's cast to the GEMM inputs: custom ops are invisible to autocast."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


def quantized_linear(x, weight, bias, site: GemmSite, probe=None) -> torch.Tensor:
    """F.linear(x, weight, bias) as three gradq GEMMs.

    probe: an optional [3] tensor requiring grad; backward gives it the wgrad gradient's
    quantization statistics (`quantizer.quantization_stats`) as its gradient.
    """
    return _matmul(x, weight.t(), bias, site, probe)


def conv2d_is_gemm(kernel, stride, padding, dilation, groups) -> bool:
    """Whether F.conv2d with this geometry (pairs of ints) is a GEMM up to a layout change:
    groups 1, no padding, and a 1x1 kernel (any stride; dilation is moot) or a kernel equal
    to its stride with dilation 1, whose windows tile the input without overlapping."""
    if groups != 1 or tuple(padding) != (0, 0):
        return False
    kernel, stride = tuple(kernel), tuple(stride)
    return kernel == (1, 1) or (kernel == stride and tuple(dilation) == (1, 1))


def conv2d_is_implicit_gemm(kernel, dilation, groups) -> bool:
    """Whether gradq's implicit-GEMM path (`gradq.conv2d`) takes F.conv2d with this geometry:
    groups 1 and dilation 1 (moot for a 1x1 kernel); any stride and padding."""
    return groups == 1 and (tuple(kernel) == (1, 1) or tuple(dilation) == (1, 1))


class _QuantizedConv2d(torch.autograd.Function):
    """out = F.conv2d(x, w, bias, stride, padding) as three `gradq.conv2d` GEMMs."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, site: GemmSite, probe):
        ctx.save_for_backward(x, weight)
        ctx.site = site = GemmSite(*site)
        ctx.geometry = stride, padding
        ctx.has_bias = bias is not None
        ctx.has_probe = probe is not None
        size = conv2d_output_size(x.shape[2:], weight.shape[2:], stride, padding)
        return _conv(x, weight, bias, stride, padding, size, site.forward, Role.FORWARD, site)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        site, (stride, padding) = ctx.site, ctx.geometry
        grad_x = grad_w = grad_bias = grad_probe = None
        if ctx.needs_input_grad[0]:
            size = x.shape[2:]
            grad_x = _conv(grad_out, weight, None, stride, padding, size, site.dgrad_a,
                           Role.DGRAD, site)  # fmt: skip
        if ctx.needs_input_grad[1]:
            size = weight.shape[2:]
            grad_w = _conv(x, grad_out, None, stride, padding, size, site.dgrad_b,
                           Role(site.role_b), site)  # fmt: skip
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=(0, 2, 3))
        if ctx.has_probe and ctx.needs_input_grad[6]:
            # dY's quantization in wgrad: one slice per output channel (or the tensor).
            rows = grad_out.transpose(0, 1).reshape(grad_out.shape[1], -1)
            grad_probe = torch.ops.gradq.quantization_stats(rows, site.dgrad_b[1], -1, site.module)
        return grad_x, grad_w, grad_bias, None, None, None, grad_probe


def _conv(a, b, bias, stride, padding, size, specs, role: Role, site: GemmSite):
    return torch.ops.gradq.conv2d(
        a, b, bias, list(stride), list(padding), list(size), specs[0], specs[1], role.value,
        site.module,
    )  # fmt: skip


def quantized_conv2d(
    x, weight, bias, stride, padding, dilation, groups, site: GemmSite, probe=None
) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups) as three gradq GEMMs, for
    a convolution of groups 1 and dilation 1 (any dilation for a 1x1 kernel); probe: as in
    `quantized_linear`.

    A convolution that is a GEMM up to a layout change (`conv2d_is_gemm`: no padding, and a
    1x1 kernel or a kernel equal to its stride) becomes `gradq.mm`s: its windows do not
    overlap, so the input needs only a layout change, no im2col. With kernel k x l, stride
    s x t, input [B, C, H, W] and output [B, O, H', W']: the 1x1 case first keeps every s-th
    row and t-th column; the input is cropped to H'k x W'l (the rows and columns conv2d never
    reads), viewed as [B, C, H', k, W', l] and copied as rows [B H' W', C k l]; the GEMM with
    the weight [O, C k l] gives [B H' W', O], copied back to a contiguous [B, O, H', W'].
    With dynamic spatial sizes, the strided slice and the crop make Dynamo guard on H and W
    modulo the stride (whether the slice keeps the input contiguous): a few recompiles at
    most, where F.conv2d has none. Static image sizes, the usual case, specialise nothing.

    Every other such convolution (k x k with overlapping windows, padding) becomes
    `gradq.conv2d`s, implicit GEMMs with their own scale groupings (`quantizer`'s
    convolution section: X and dY per image, W per channel).
    """
    kh, kw = weight.shape[-2:]
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if not conv2d_is_implicit_gemm((kh, kw), dilation, groups) or isinstance(padding[0], str):
        raise ValueError(
            "quantized_conv2d takes groups 1 and dilation 1 (any for a 1x1 kernel) with "
            f"numeric padding; got kernel {(kh, kw)}, stride {stride}, padding {padding}, "
            f"dilation {dilation}, groups {groups}"
        )
    unbatched = x.dim() == 3
    x, weight, bias = _autocast(x.unsqueeze(0) if unbatched else x, weight, bias)
    if not conv2d_is_gemm((kh, kw), stride, padding, dilation, groups):
        out = _QuantizedConv2d.apply(x, weight, bias, stride, padding, site, probe)
        return out.squeeze(0) if unbatched else out
    if (kh, kw) == (1, 1):
        x = x[:, :, :: stride[0], :: stride[1]]  # then cropped to itself, reshaped to rows
    batch, channels, height, width = x.shape
    out_h, out_w = height // kh, width // kw
    patches = x[:, :, : out_h * kh, : out_w * kw].reshape(batch, channels, out_h, kh, out_w, kw)
    rows = patches.permute(0, 2, 4, 1, 3, 5).reshape(-1, channels * kh * kw)
    out = quantized_linear(rows, weight.reshape(weight.shape[0], -1), bias, site, probe)
    out = out.reshape(batch, out_h, out_w, -1).permute(0, 3, 1, 2).contiguous()
    return out.squeeze(0) if unbatched else out


def quantized_matmul(a, b, site: GemmSite, probe=None) -> torch.Tensor:
    """torch.matmul(a, b) as gradq GEMMs (probe: as in `quantized_linear`)."""
    return _matmul(a, b, None, site, probe)


def _matmul(a, b, bias, site: GemmSite, probe=None) -> torch.Tensor:
    a, b, bias = _autocast(a, b, bias)
    if b.dim() == 2:
        # A 2-D right operand (a weight) meets all rows of a at once: one GEMM per role, so
        # wgrad contracts over every token instead of summing per-batch products.
        out = _QuantizedMatmul.apply(a.reshape(-1, a.shape[-1]), b, bias, site, probe)
        return out.reshape(*a.shape[:-1], b.shape[-1])
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = a.expand(*batch, *a.shape[-2:])
    b = b.expand(*batch, *b.shape[-2:])
    return _QuantizedMatmul.apply(a, b, bias, site, probe)


def quantized_attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    qk_site: GemmSite,
    pv_site: GemmSite,
) -> torch.Tensor:
    """F.scaled_dot_product_attention in its math form, QK^T and PV as gradq GEMMs.

    The softmax (and mask, dropout) stay in float32, as in both papers.
    """
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = quantized_matmul(query * scale, key.transpose(-2, -1), qk_site).float()
    if is_causal:
        n_q, n_k = scores.shape[-2:]
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
    return quantized_matmul(probs.to(value.dtype), value, pv_site)
