"""Exact int8 x int8 -> int32 GEMM, the integer core of every quantized GEMM.

- 2-D operands: `torch._int_mm`. cuBLAS refuses M <= 16 and K or N not a multiple of 8, so on
  CUDA the operands are zero-padded up to the nearest legal shape and the result is sliced
  back. Zeros add nothing to a dot product, so the padding is exact.
- 2-D operands on the CPU: `torch._int_mm` there is 20 to 50 times slower than a float32
  GEMM (455 ms against 21 ms for 8320x192 @ 192x576 on 2 cores). A float32 GEMM is exact on
  integers while every partial sum stays within 2^24: with |q| <= 128 that holds for 1024
  products. So a K of at most 1024 is one float32 GEMM; a longer K is cut into equal chunks of
  at most 1024 (zero-padded), each chunk's product one float32 batched GEMM, and the chunks
  are summed in int32, with no loop over the chunks.
  (This relies on true float32 GEMMs: a CPU float32 matmul precision lowered to bf16 or tf32
  through torch.backends would break it.)
- Batched operands (attention's QK^T and PV): PyTorch has no batched int8 GEMM. The integer
  products are accumulated in float64 instead, which is exact while K * 128^2 < 2^53 (any K
  below 5 * 10^11), and then converted to int32.
"""

from __future__ import annotations

import torch

# cuBLAS int8 GEMM limits (torch._int_mm on CUDA).
CUBLAS_MIN_ROWS = 17
CUBLAS_MULTIPLE = 8


def _round_up(value, multiple: int):
    return value + (-value) % multiple


def cublas_padding(m, k, n) -> tuple:
    """Padded (M, K, N) that cuBLAS's int8 GEMM accepts, for the given sizes."""
    # sym_max keeps a dynamic M symbolic instead of guarding on M > 16.
    padded_m = _round_up(torch.sym_max(m, CUBLAS_MIN_ROWS), CUBLAS_MULTIPLE)
    return padded_m, _round_up(k, CUBLAS_MULTIPLE), _round_up(n, CUBLAS_MULTIPLE)


def padded_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch._int_mm` on operands zero-padded to a cuBLAS-legal shape, sliced back."""
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = cublas_padding(m, k, n)
    a = torch.nn.functional.pad(a, (0, pk - k, 0, pm - m))
    # cuBLAS wants the second operand column-major.
    b = torch.nn.functional.pad(b, (0, pn - n, 0, pk - k)).t().contiguous().t()
    return torch._int_mm(a, b)[:m, :n]


# Products of int8 values are at most 128^2 = 2^14 in magnitude: 2^10 of them sum to at most
# 2^24, the largest range over which float32 represents every integer.
EXACT_FLOAT32_CHUNK = 1024


def chunked_float32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 a @ b for 2-D int8 operands through float32 GEMMs over K-chunks of 1024."""
    m, k = a.shape
    n = b.shape[1]
    if k <= EXACT_FLOAT32_CHUNK:  # one chunk: a plain GEMM (a guard on K under dynamic shapes)
        return torch.mm(a.float(), b.float()).to(torch.int32)
    chunks = (k + EXACT_FLOAT32_CHUNK - 1) // EXACT_FLOAT32_CHUNK
    # Equal chunks of at most 1024: K = 1100 is two chunks of 550 (not 1024 and 76), and the
    # zero padding is under one element per chunk.
    chunk = (k + chunks - 1) // chunks
    padding = chunks * chunk - k
    a_chunks = torch.nn.functional.pad(a.float(), (0, padding))
    a_chunks = a_chunks.reshape(m, chunks, chunk).transpose(0, 1)
    b_chunks = torch.nn.functional.pad(b.float(), (0, 0, 0, padding))
    b_chunks = b_chunks.reshape(chunks, chunk, n)
    return torch.bmm(a_chunks, b_chunks).to(torch.int32).sum(dim=0, dtype=torch.int32)


def int8_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for int8 a [..., M, K] and b [..., K, N], exact, as int32 [..., M, N]."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"int8_gemm takes int8 operands, got {a.dtype} and {b.dtype}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"int8_gemm: inner sizes differ, a {tuple(a.shape)} b {tuple(b.shape)}")
    if a.dim() == 2 and b.dim() == 2:
        if a.is_cuda:
            return padded_int_mm(a, b)
        return chunked_float32_mm(a, b)
    return torch.matmul(a.double(), b.double()).to(torch.int32)


# --------------------------------------------------------------------------- convolutions
#
# A dense convolution (groups 1, dilation 1) is an implicit GEMM: out[n, o, p] = sum over
# (c, kh, kw) of W[o, c, kh, kw] * X[n, c, p * stride - padding + (kh, kw)]. Its three exact
# integer forms, built from the int8 GEMM above so that they are exact on every device (a
# float convolution may pick Winograd or FFT algorithms, which are not exact on integers):
# - forward: the windows of the zero-padded input copied as int8 rows [N H' W', C kh kw]
#   (`int8_patches`), times the weight as [C kh kw, O];
# - input gradient: the forward convolution, stride 1, of dY with zeros inserted between its
#   pixels and padded (`input_grad_operands`) by the weight flipped and transposed;
# - weight gradient: dY as [O, N H' W'] times the input's patches.


def conv2d_output_size(size, kernel, stride, padding) -> tuple:
    """F.conv2d's output height and width for input (H, W) and pairs kernel, stride, padding."""
    return tuple((size[i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in range(2))


def int8_patches(x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """The conv2d windows of x [N, C, H, W] (zero-padded) as rows [N H' W', C kh kw]."""
    batch, channels = x.shape[:2]
    padded = torch.nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    windows = padded.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])
    # [N, C, H', W', kh, kw] -> [N, H', W', C, kh, kw]: c, kh, kw in the weight's order.
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * kernel[0] * kernel[1])


def int8_conv2d(x: torch.Tensor, w: torch.Tensor, stride, padding) -> torch.Tensor:
    """F.conv2d(x, w, None, stride, padding) for int8 x [N, C, H, W], w [O, C, kh, kw], exact,
    as int32 [N, O, H', W'] (groups 1, dilation 1)."""
    batch, out_channels = x.shape[0], w.shape[0]
    kernel = tuple(w.shape[2:])
    out_h, out_w = conv2d_output_size(x.shape[2:], kernel, stride, padding)
    rows = int8_patches(x, kernel, stride, padding)
    acc = int8_gemm(rows, w.reshape(out_channels, -1).t())
    # Contiguous NCHW, as F.conv2d returns.
    return acc.reshape(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2).contiguous()


def input_grad_operands(
    dy: torch.Tensor, w: torch.Tensor, stride, padding, input_size
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, w') with conv2d(z, w', stride 1, padding 0) = the input gradient of conv2d.

    dX[i] = sum over (o, k) with p * s - pad + k = i of dY[p] W[k]. With z = dY with s - 1
    zeros inserted between neighbours, z[p * s] = dY[p], that is dX[i] = sum_j z[i + pad -
    (K - 1) + j] W[K - 1 - j]: a stride-1 convolution of z, padded by K - 1 - pad before and by
    what makes the output H long after (negative padding crops), with the flipped weight whose
    input and output channels are swapped. Zeros change no sum: this is exact.
    """
    batch, out_channels, out_h, out_w = dy.shape
    kernel = tuple(w.shape[2:])
    # Insert the zeros with a pad of a trailing unit dimension (no scatter, no mutation).
    spread = dy.reshape(batch, out_channels, out_h, 1, out_w, 1)
    spread = torch.nn.functional.pad(spread, (0, stride[1] - 1, 0, 0, 0, stride[0] - 1))
    spread = spread.reshape(batch, out_channels, out_h * stride[0], out_w * stride[1])
    spread = spread[:, :, : (out_h - 1) * stride[0] + 1, : (out_w - 1) * stride[1] + 1]
    pads = []
    for i in (1, 0):  # F.pad's order: width first
        before = kernel[i] - 1 - padding[i]
        after = input_size[i] - (spread.shape[2 + i] + before - kernel[i] + 1)
        pads += [before, after]
    z = torch.nn.functional.pad(spread, tuple(pads))
    return z, w.transpose(0, 1).flip(2, 3)


def int8_conv2d_input_grad(
    dy: torch.Tensor, w: torch.Tensor, stride, padding, input_size
) -> torch.Tensor:
    """The input gradient of conv2d for int8 dY [N, O, H', W'] and w [O, C, kh, kw], exact,
    as int32 [N, C, H, W] ((H, W) = input_size)."""
    z, flipped = input_grad_operands(dy, w, stride, padding, input_size)
    return int8_conv2d(z, flipped, (1, 1), (0, 0))


def int8_conv2d_weight_grad(
    x: torch.Tensor, dy: torch.Tensor, stride, padding, kernel
) -> torch.Tensor:
    """The weight gradient of conv2d for int8 x [N, C, H, W] and dY [N, O, H', W'], exact, as
    int32 [O, C, kh, kw]: dY as [O, N H' W'] times x's patches [N H' W', C kh kw]."""
    out_channels, channels = dy.shape[1], x.shape[1]
    rows = dy.transpose(0, 1).reshape(out_channels, -1)
    acc = int8_gemm(rows, int8_patches(x, kernel, stride, padding))
    return acc.reshape(out_channels, channels, *kernel)
