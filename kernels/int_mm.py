"""Exact int8 x int8 -> int32 GEMM, the integer core of every quantized GEMM.

- 2-D operands: `torch._int_mm`. cuBLAS refuses M <= 16 and K or N not a multiple of 8, so on
  CUDA the operands are zero-padded up to the nearest legal shape and the result is sliced
  back. Zeros add nothing to a dot product, so the padding is exact.
- 2-D operands on the CPU: `torch._int_mm` there is 20 to 50 times slower than a float32
  GEMM (455 ms against 21 ms for 8320x192 @ 192x576 on 2 cores). A float32 GEMM is exact on
  integers while every partial sum stays within 2^24: with |q| <= 128 that holds for 1024
  products. So K is cut into equal chunks of at most 1024 (zero-padded), each chunk's product
  is one float32 batched GEMM, and the chunks are summed in int32. No loop: shapes stay symbolic.
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
    chunks = (k + EXACT_FLOAT32_CHUNK - 1) // EXACT_FLOAT32_CHUNK
    # Equal chunks of at most 1024: K = 64 stays one chunk of 64 (not 1024, mostly zeros),
    # and the zero padding is under one element per chunk.
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
