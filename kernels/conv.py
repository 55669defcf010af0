"""INT8 implicit-GEMM convolution with the dequantize in its epilogue.

    out[n, o] = float32(conv2d(x, w, stride, padding)[n, o]) * x_scale[n] * w_scale[o]
                (+ bias[o]),  then cast to out_dtype

`int8_scaled_conv2d(x, w, x_scale, w_scale, stride, padding, bias, out_dtype)`: x int8
[N, C, H, W] (any strides: NCHW, channels-last, views), w int8 [O, C, kh, kw], x_scale float32
[N] (one scale per image, the finest a convolution's input can have: `gradq_fx.quantizer`'s
convolution section), w_scale float32 [O], bias float [O] or None, stride and padding pairs of
ints (groups 1, dilation 1); out_dtype float32, bfloat16 or
float16. The output is a contiguous [N, O, H', W'].

No im2col: each program owns a tile of output pixels (n, oh, ow) x output channels, and walks
the kernel window (kh, kw) and the input channels in BLOCK_K steps, loading the input pixel
that each output pixel reads at that window position straight from x (padding and the ragged
edges are masked loads that read 0). This is `gradq_fx.quantizer.quantized_conv2d` after
quantization; the reference path is that expression over `kernels.int_mm.int8_conv2d`.
Numerical choices (as in `kernels/gemm.py`):
- int8 products summed exactly in int32 by `tl.dot`; zero-filled loads add nothing. It
  overflows only past C kh kw = 2^31 / 128^2 = 131072 for all-(-128) operands.
- The epilogue does the reference's float32 operations in its order (convert, times the
  image's scale, times the channel's scale, plus the bias: `common.dequantize_tile`),
  launched with `enable_fp_fusion=False` so that no fused multiply-add changes a rounding:
  float32 output is bit-equal to the reference's; bfloat16 is rounded to nearest even on the
  bits (`common.store_tile`).
"""

from __future__ import annotations

import torch

from gradq_fx.kernels import common
from gradq_fx.kernels.common import launches_triton, tile_config, tl, triton
from gradq_fx.kernels.int_mm import conv2d_output_size, int8_conv2d


def _pair_of_ints(value) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def check_conv_args(x, w, x_scale, w_scale, bias, stride, padding, out_dtype) -> None:
    """Raise ValueError, naming the argument, for inputs `int8_scaled_conv2d` does not take."""
    name = "int8_scaled_conv2d"
    common.check_tensor(name, "x", x, 4, (torch.int8,))
    common.check_tensor(name, "w", w, 4, (torch.int8,))
    if x.shape[1] != w.shape[1]:
        raise ValueError(
            f"{name}: x has {x.shape[1]} channels, w expects {w.shape[1]} (groups 1 only): "
            f"x {tuple(x.shape)}, w {tuple(w.shape)}"
        )
    if not _pair_of_ints(stride) or min(stride) < 1:
        raise ValueError(f"{name}: stride must be two positive ints, got {stride!r}")
    if not _pair_of_ints(padding) or min(padding) < 0:
        raise ValueError(f"{name}: padding must be two non-negative ints, got {padding!r}")
    out_size = conv2d_output_size(x.shape[2:], w.shape[2:], stride, padding)
    if min(out_size) < 1:
        raise ValueError(
            f"{name}: the kernel {tuple(w.shape[2:])} does not fit the input "
            f"{tuple(x.shape[2:])} padded by {tuple(padding)}"
        )
    common.check_scales(name, "x_scale", x_scale, (x.shape[0],))
    common.check_scales(name, "w_scale", w_scale, (w.shape[0],))
    common.check_epilogue(name, bias, w.shape[0], out_dtype)
    tensors = {"x": x, "w": w, "x_scale": x_scale, "w_scale": w_scale, "bias": bias}
    common.check_devices(name, "x", tensors)


def int8_scaled_conv2d_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`int8_scaled_conv2d` in torch (module docstring), exact int32 convolution from `int_mm`."""
    stride, padding = tuple(stride), tuple(padding)
    check_conv_args(x, w, x_scale, w_scale, bias, stride, padding, out_dtype)
    # quantizer.quantized_conv2d's epilogue, in its order.
    acc = int8_conv2d(x, w, stride, padding)
    out = acc.float() * x_scale[:, None, None, None] * w_scale[None, :, None, None]
    if bias is not None:
        out = out + bias.float()[:, None, None]
    return out.to(out_dtype).contiguous()


@torch.library.custom_op("gradq::int8_scaled_conv2d", mutates_args=())
def int8_scaled_conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    stride: list[int],
    padding: list[int],
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """conv2d of int8 x [N, C, H, W] by int8 w [O, C, kh, kw], dequantized in the epilogue
    (module docstring): [N, O, H', W'].

    Triton on CUDA tensors and under TRITON_INTERPRET=1 (`common.launches_triton`), else
    `int8_scaled_conv2d_reference`.
    """
    stride, padding = tuple(stride), tuple(padding)
    if not launches_triton(x):
        return int8_scaled_conv2d_reference(
            x, w, x_scale, w_scale, stride, padding, bias, out_dtype
        )
    check_conv_args(x, w, x_scale, w_scale, bias, stride, padding, out_dtype)
    return _launch(x, w, x_scale, w_scale, bias, stride, padding, out_dtype)


@int8_scaled_conv2d.register_fake
def _(x, w, x_scale, w_scale, stride, padding, bias=None, out_dtype=torch.float32):
    stride, padding = tuple(stride), tuple(padding)
    check_conv_args(x, w, x_scale, w_scale, bias, stride, padding, out_dtype)
    out_size = conv2d_output_size(x.shape[2:], w.shape[2:], stride, padding)
    return x.new_empty((x.shape[0], w.shape[0], *out_size), dtype=out_dtype)


def _launch(x, w, x_scale, w_scale, bias, stride, padding, out_dtype) -> torch.Tensor:
    batch, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = w.shape
    out_h, out_w = conv2d_output_size((height, width), (kernel_h, kernel_w), stride, padding)
    out = torch.empty((batch, out_channels, out_h, out_w), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    pixels = batch * out_h * out_w

    def grid(meta):
        return (triton.cdiv(pixels, meta["BLOCK_M"]) * triton.cdiv(out_channels, meta["BLOCK_N"]),)

    _int8_conv2d_kernel[grid](
        x,
        w,
        x_scale,
        w_scale,
        bias if bias is not None else x_scale,  # unused placeholder when HAS_BIAS is False
        out,
        pixels,
        channels,
        height,
        width,
        out_channels,
        out_h,
        out_w,
        kernel_h,
        kernel_w,
        *stride,
        *padding,
        *x.stride(),
        *w.stride(),
        x_scale.stride(0),
        w_scale.stride(0),
        0 if bias is None else bias.stride(0),
        *out.stride(),
        HAS_BIAS=bias is not None,
        OUT_BF16=out_dtype == torch.bfloat16,
        enable_fp_fusion=False,  # keep the epilogue's multiply and add separately rounded
    )
    return out


if triton is not None:
    # int8 tensor-core tiles for CUDA (BLOCK_K >= 32 for the int8 MMA). BLOCK_K runs over
    # input channels at one window position: channel counts below it waste part of a step.
    # Tiles that ptxas (sm_90a) fits in registers without spilling under both Triton 3.6 and
    # 3.8 (tests/kernels/test_cuda_compile.py); the window's index arithmetic costs registers
    # that a plain GEMM's loop does not, so the tiles are smaller than gemm.py's. Under 3.6,
    # 64x128x64 (8 warps) and 32x128x64 (4 warps) spilled 20 and 844 bytes, and no tile with
    # BLOCK_K 64 over 32 x 128 fits both versions: 32x128x64 and 32x64x64 at 8 warps took
    # their places. Not timed yet.
    _CUDA_CONFIGS = [
        tile_config(64, 128, 32, stages=4, warps=8),
        tile_config(128, 64, 32, stages=4, warps=8),
        tile_config(32, 128, 64, stages=4, warps=8),
        tile_config(64, 64, 32, stages=4, warps=4),
        tile_config(32, 64, 64, stages=4, warps=8),
        tile_config(32, 64, 32, stages=4, warps=4),
    ]

    @common.autotune(
        ["P", "C", "OC", "KH", "KW", "stride_xc", "HAS_BIAS"],
        _CUDA_CONFIGS,
        common.GEMM_INTERPRETER_CONFIGS,
    )
    @triton.jit
    def _int8_conv2d_kernel(
        # pointers
        x_ptr,
        w_ptr,
        x_scale_ptr,
        w_scale_ptr,
        bias_ptr,
        out_ptr,
        # sizes: P = N * OH * OW output pixels
        P,
        C,
        H,
        W,
        OC,
        OH,
        OW,
        KH,
        KW,
        # geometry
        STRIDE_H,
        STRIDE_W,
        PAD_H,
        PAD_W,
        # strides
        stride_xn,
        stride_xc,
        stride_xh,
        stride_xw,
        stride_wo,
        stride_wc,
        stride_wh,
        stride_ww,
        stride_xs,
        stride_ws,
        stride_bias,
        stride_on,
        stride_oo,
        stride_oh,
        stride_ow,
        # meta-parameters
        HAS_BIAS: tl.constexpr,
        OUT_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # One program per tile of output pixels x output channels, in grouped order
        # (`common.grouped_tile`): neighbours share weights and input rows in L2.
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(P, BLOCK_M), tl.cdiv(OC, BLOCK_N)
        pid_m, pid_n = common.grouped_tile(pid, tiles_m, tiles_n, GROUP_M)

        # 32-bit indices (pixel and channel counts fit), 64-bit only where they meet strides.
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < P
        mask_n = offs_n < OC
        # Output pixel (n, oh, ow) of each row; the top-left input pixel of its window.
        image = offs_m // (OH * OW)
        oh = (offs_m % (OH * OW)) // OW
        ow = offs_m % OW
        top = oh * STRIDE_H - PAD_H
        left = ow * STRIDE_W - PAD_W
        offs_k = tl.arange(0, BLOCK_K)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for kh in range(0, KH):
            ih = top + kh
            for kw in range(0, KW):
                iw = left + kw
                # Rows whose window position falls in the padding read zeros.
                inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                x_rows = (
                    x_ptr
                    + image.to(tl.int64) * stride_xn
                    + ih.to(tl.int64) * stride_xh
                    + iw.to(tl.int64) * stride_xw
                )
                w_cols = w_ptr + offs_n.to(tl.int64) * stride_wo + kh * stride_wh + kw * stride_ww
                for c0 in range(0, C, BLOCK_K):
                    offs_c = c0 + offs_k
                    mask_c = offs_c < C
                    a = tl.load(
                        x_rows[:, None] + offs_c[None, :] * stride_xc,
                        mask=inside[:, None] & mask_c[None, :],
                        other=0,
                    )
                    b = tl.load(
                        w_cols[None, :] + offs_c[:, None] * stride_wc,
                        mask=mask_c[:, None] & mask_n[None, :],
                        other=0,
                    )
                    acc = tl.dot(a, b, acc, out_dtype=tl.int32)

        # Epilogue, in the reference's order: float32(acc) * x_scale[n] * w_scale[o] + bias.
        x_scale = tl.load(x_scale_ptr + image * stride_xs, mask=mask_m)
        w_scale = tl.load(w_scale_ptr + offs_n * stride_ws, mask=mask_n)
        out = common.dequantize_tile(
            acc, x_scale, w_scale, bias_ptr, offs_n, stride_bias, mask_n, HAS_BIAS
        )
        out_rows = (
            out_ptr
            + image.to(tl.int64) * stride_on
            + oh.to(tl.int64) * stride_oh
            + ow.to(tl.int64) * stride_ow
        )
        out_ptrs = out_rows[:, None] + offs_n[None, :].to(tl.int64) * stride_oo
        common.store_tile(out_ptrs, out, mask_m[:, None] & mask_n[None, :], OUT_BF16)
