"""What gradq's rewrite calls in place of F.linear, torch.matmul, F.conv2d and
F.scaled_dot_product_attention: autograd functions whose forward and backward are gradq GEMMs
(`torch.ops.gradq.mm`, `torch.ops.gradq.conv2d`, `gradq_fx.ops`), each labelled with its
role, its operands' kinds and its module, and with each operand's quantization.

    gradq_linear(x, w, b, site)      forward  gradq.mm(x, w^T, b, ..., "forward", "AW", module)
                                     dgrad    gradq.mm(dY, w, ..., "dgrad", "GW", module)
                                     wgrad    gradq.mm(x^T, dY, ..., "wgrad", "AG", module)
    gradq_matmul(q, k^T, site)       the same with "AA", "GA" and "AG" (the right operand's
                                     gradient is a dgrad)
    gradq_conv2d(x, w, b, ...)       gradq.conv2d, or gradq.mm where the convolution is a GEMM
                                     up to a layout change
    gradq_attention(q, k, v, ...)    QK^T and PV as gradq_matmul; softmax in float32
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from gradq_fx import ops  # noqa: F401  (registers torch.ops.gradq.*)
from gradq_fx.config import Operand, Role
from gradq_fx.kernels.int_mm import conv2d_output_size

_W, _A, _G = (kind.value for kind in (Operand.WEIGHT, Operand.ACTIVATION, Operand.GRADIENT))


class GemmSite(NamedTuple):
    """The three GEMMs of one rewritten matmul: each role's operand specs ("" = float).

    Strings and tuples only: the Dynamo graph stores it as a node argument, and FX writes
    node arguments into generated Python source (where it arrives as a plain tuple).
    """

    module: str
    forward: tuple[str, str]  # a @ b
    grad_left: tuple[str, str]  # a's gradient = grad_out @ b^T
    grad_right: tuple[str, str]  # b's gradient = a^T @ grad_out
    right: str  # what b is: an `Operand` letter, "W" (a weight: its gradient is a wgrad) or "A"

    @property
    def right_role(self) -> Role:
        """The role of the GEMM that computes b's gradient."""
        return Role.WGRAD if self.right == _W else Role.DGRAD

    def gemms(self) -> dict[str, tuple[tuple[str, str], Role, str]]:
        """Each GEMM's (specs, role, operand kinds), by what it computes."""
        return {
            "forward": (self.forward, Role.FORWARD, _A + self.right),
            "grad_left": (self.grad_left, Role.DGRAD, _G + self.right),
            "grad_right": (self.grad_right, self.right_role, _A + _G),
        }


def _mm(a, b, bias, site: GemmSite, gemm: str) -> torch.Tensor:
    (a_spec, b_spec), role, operands = site.gemms()[gemm]
    return torch.ops.gradq.mm(a, b, bias, a_spec, b_spec, role.value, operands, site.module)


class _QuantizedMatmul(torch.autograd.Function):
    """out = a @ b (+ bias), with a [..., M, K], b [..., K, N] of equal batch dims."""

    @staticmethod
    def forward(ctx, a, b, bias, site: GemmSite, probe):
        ctx.save_for_backward(a, b)
        ctx.site = site = GemmSite(*site)
        ctx.has_bias = bias is not None
        ctx.has_probe = probe is not None
        return _mm(a, b, bias, site, "forward")

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        site = ctx.site
        grad_a = grad_b = grad_bias = grad_probe = None
        if ctx.needs_input_grad[0]:
            grad_a = _mm(grad_out, b.mT, None, site, "grad_left")
        if ctx.needs_input_grad[1]:
            grad_b = _in_layout_of(b, _mm(a.mT, grad_out, None, site, "grad_right"))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        if ctx.has_probe and ctx.needs_input_grad[4]:
            # The probe's "gradient" is the statistics of dY's quantization in wgrad: it
            # reaches probe.grad on the device, with no host synchronisation.
            grad_probe = torch.ops.gradq.quantization_stats(
                grad_out, site.grad_right[1], -2, site.module
            )
        return grad_a, grad_b, grad_bias, None, grad_probe


def _in_layout_of(b: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
    """grad_b laid out as b, where b is a transposed matrix (a Linear's weight.t()): its
    gradient then reaches the weight row-major, as the weight is. Written in another layout,
    autograd would copy every weight gradient into the weight's layout after backward (a
    transposing copy per layer and step). Compiled, the GEMM's epilogue writes it so."""
    if b.dim() == 2 and not b.is_contiguous() and b.mT.is_contiguous():
        return grad_b.mT.contiguous().mT
    return grad_b


def _autocast(*tensors):
    """Apply autocast's cast to the GEMM inputs: custom ops are invisible to autocast."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


def gradq_linear(x, weight, bias, site: GemmSite, probe=None) -> torch.Tensor:
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
        return _conv(x, weight, bias, stride, padding, size, site, "forward")

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        site, (stride, padding) = ctx.site, ctx.geometry
        grad_x = grad_w = grad_bias = grad_probe = None
        if ctx.needs_input_grad[0]:
            size = x.shape[2:]
            grad_x = _conv(grad_out, weight, None, stride, padding, size, site, "grad_left")
        if ctx.needs_input_grad[1]:
            size = weight.shape[2:]
            grad_w = _conv(x, grad_out, None, stride, padding, size, site, "grad_right")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=(0, 2, 3))
        if ctx.has_probe and ctx.needs_input_grad[6]:
            # dY's quantization in wgrad: one slice per output channel (or the tensor).
            rows = grad_out.transpose(0, 1).reshape(grad_out.shape[1], -1)
            grad_probe = torch.ops.gradq.quantization_stats(
                rows, site.grad_right[1], -1, site.module
            )
        return grad_x, grad_w, grad_bias, None, None, None, grad_probe


def _conv(a, b, bias, stride, padding, size, site: GemmSite, gemm: str):
    (a_spec, b_spec), role, operands = site.gemms()[gemm]
    return torch.ops.gradq.conv2d(
        a, b, bias, list(stride), list(padding), list(size), a_spec, b_spec, role.value,
        operands, site.module,
    )  # fmt: skip


def gradq_conv2d(
    x, weight, bias, stride, padding, dilation, groups, site: GemmSite, probe=None
) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups) as three gradq GEMMs, for
    a convolution of groups 1 and dilation 1 (any dilation for a 1x1 kernel); probe: as in
    `gradq_linear`.

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
            "gradq_conv2d takes groups 1 and dilation 1 (any for a 1x1 kernel) with "
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
    out = gradq_linear(rows, weight.reshape(weight.shape[0], -1), bias, site, probe)
    out = out.reshape(batch, out_h, out_w, -1).permute(0, 3, 1, 2).contiguous()
    return out.squeeze(0) if unbatched else out


def gradq_matmul(a, b, site: GemmSite, probe=None) -> torch.Tensor:
    """torch.matmul(a, b) as gradq GEMMs (probe: as in `gradq_linear`)."""
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


def gradq_attention(
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
    scores = gradq_matmul(query * scale, key.transpose(-2, -1), qk_site).float()
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
    return gradq_matmul(probs.to(value.dtype), value, pv_site)
