"""The triton lowering: gradq's own Triton kernels, registered as custom ops.

Each operand is quantized along the contracted dimension in one pass
(`kernels/quantize.py`; per-row iqr clips from `kernels/iqr.py`, one program per row, with no
[rows, 640] histogram in memory), then one INT8 GEMM (`kernels/gemm.py`, `kernels/conv.py`)
applies both scales and the bias in its epilogue. On a CPU tensor the kernel ops run their
pure-torch references. Nearest rounding gives the reference's numbers: unscaled, bit for
bit; with least-squares scales or iqr clips, to float rounding of their sums. Stochastic
rounding draws other random bits than the reference.
"""

from __future__ import annotations

import torch

from gradq_fx import quantizer
from gradq_fx.config import Clipping, Granularity, Lowering, QuantSpec, Role, Rounding
from gradq_fx.kernels import conv as conv_kernel
from gradq_fx.kernels import gemm
from gradq_fx.kernels import iqr as iqr_kernel
from gradq_fx.kernels import quantize as quantize_kernel
from gradq_fx.kernels.int_mm import input_grad_operands, int8_patches
from gradq_fx.lowerings.base import GemmLowering


def kernel_clip(rows: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """Per-row iqr's clipping values from `kernels/iqr.py` ([R] float32), or None where the
    spec clips otherwise."""
    if spec.granularity is Granularity.PER_ROW and spec.clipping is Clipping.IQR:
        return iqr_kernel.iqr_clip_rows(rows, spec.bits)
    return None


class Triton(GemmLowering):
    kind = Lowering.TRITON
    measured = True

    def quantize_rows(self, rows, spec):
        """The quantize kernel: one opaque launch. It takes per-row minmax's absmax itself;
        the other clips come from `kernel_clip` or `quantizer.clip_value`."""
        per_row = spec.granularity is Granularity.PER_ROW
        clip = kernel_clip(rows, spec)
        if clip is None and not (per_row and spec.clipping is Clipping.MINMAX):
            flat = rows.float() if per_row else rows.float().reshape(1, -1)
            clip = quantizer.clip_value(flat, spec)
            clip = clip if per_row else clip.reshape(())
        stochastic = spec.rounding is Rounding.STOCHASTIC
        seed = None
        if stochastic:  # fresh random bits for every call, as torch.rand_like gives the reference
            seed = torch.randint(2**31 - 1, (1,), device=rows.device, dtype=torch.int64)
        return quantize_kernel.quantize_rows(rows, clip, spec.bits, stochastic, seed, spec.scaling)

    def mm(self, a, b, bias, a_spec, b_spec):
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        q_a, scale_a = self.quantize_rows(a.reshape(-1, k), a_spec)
        q_bt, scale_b = self.quantize_rows(b.mT.reshape(-1, k), b_spec)  # b^T's rows
        if a.dim() == 2:
            return gemm.int8_scaled_mm(q_a, q_bt.t(), scale_a, scale_b, bias, a.dtype)
        batch = a.shape[:-2]  # equal to b's: the rewrite's matmul expands both
        out = gemm.int8_scaled_bmm(
            q_a.view(-1, m, k),
            q_bt.view(-1, n, k).mT,
            scale_a.view(-1, m),
            scale_b.view(-1, n),
            bias,
            a.dtype,
        )
        return out.view(*batch, m, n)

    def conv2d(self, a, b, bias, stride, padding, size, a_spec, b_spec, role):
        """The operands quantized as `quantizer`'s convolution section says (per image / per
        channel):
        - forward: the implicit-GEMM kernel (`kernels/conv.py`), scales and bias in its epilogue;
        - dgrad: the same kernel, stride 1, on dY with zeros inserted and padded
          (`int_mm.input_grad_operands`): exact, but at stride s it multiplies s^2 times as
          many (mostly zero) values as needed;
        - wgrad: dY as [O, N H' W'] times the input's int8 patches [N H' W', C kh kw] (an
          explicit im2col copy, kh kw / s^2 times the input's size) in the scaled GEMM kernel.
        """
        if role is Role.FORWARD:
            q_x, x_scale = self.quantize_slices(a, a_spec, keep=0)
            q_w, w_scale = self.quantize_slices(b, b_spec, keep=0)
            return conv_kernel.int8_scaled_conv2d(
                q_x, q_w, x_scale, w_scale, stride, padding, bias, a.dtype
            )
        if role is Role.DGRAD:
            q_dy, dy_scale = self.quantize_slices(a, a_spec, keep=0)
            q_w, w_scale = self.quantize_slices(b, b_spec, keep=1)
            z, flipped = input_grad_operands(q_dy, q_w, stride, padding, size)
            return conv_kernel.int8_scaled_conv2d(
                z, flipped, dy_scale, w_scale, (1, 1), (0, 0), None, a.dtype
            )
        q_x, x_scale = self.quantize_slices(a, a_spec, keep=1)
        q_dy, dy_scale = self.quantize_slices(b, b_spec, keep=1)
        out_channels, channels = b.shape[1], a.shape[1]
        rows = q_dy.transpose(0, 1).reshape(out_channels, -1)
        patches = int8_patches(q_x, size, stride, padding)
        col_scale = x_scale.repeat_interleave(size[0] * size[1])  # columns are (c, kh, kw)
        out = gemm.int8_scaled_mm(rows, patches, dy_scale, col_scale, None, a.dtype)
        return out.reshape(out_channels, channels, *size)

    def stats(self, x, spec, dim):
        """The reference's statistics with per-row iqr clips from `kernels/iqr.py` (the rest
        plain torch, for Inductor to fuse into one reduction): the reference IQR's
        [rows, 640] histogram and [rows, 8, C] candidate scoring would otherwise run again,
        beside the wgrad's own clip. The clip's input is the wgrad's (dY^T's rows), so the
        partitioner's CSE can keep one call for both."""
        clip = kernel_clip(quantizer.as_rows(x, dim, per_row=True), spec)
        return quantizer.quantization_stats(x, spec, dim, clip)


TRITON = Triton()
