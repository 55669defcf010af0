"""INT8 GEMM with the dequantize in its epilogue: int32 accumulation, float output in one kernel.

    out = float32(a @ b) * row_scale[:, None] * col_scale[None, :]  (+ bias[None, :])
    out = out.to(out_dtype)

`int8_scaled_mm`:  a int8 [M, K], b int8 [K, N], row_scale float32 [M], col_scale float32 [N].
`int8_scaled_bmm`: a int8 [B, M, K], b int8 [B, K, N], row_scale [B, M], col_scale [B, N]
(attention's QK^T and PV: PyTorch has no batched int8 GEMM). bias: float [N] or None;
out_dtype: float32, bfloat16 or float16. Operands may have any strides (transposed views,
expanded batch dimensions); the output is contiguous.

This is `gradq_fx.quantizer.quantized_matmul` after quantization, and the reference path is
literally that expression over `kernels.int_mm.int8_gemm`. Numerical choices:
- The accumulation is exact: int8 products summed in int32 (`tl.dot` with an int32
  accumulator; zero-filled masked loads add nothing at ragged edges). It overflows only past
  K = 2^31 / 128^2 = 131072 for all-(-128) operands.
- The epilogue performs the reference's float32 operations in the reference's order:
  convert the accumulator (round to nearest even above 2^24, as torch's int->float does), times
  the row scale, times the column scale, plus the bias (`common.dequantize_tile`, launched
  with `enable_fp_fusion=False`). The float32 output is therefore bit-equal to the reference's.
- bfloat16 output is rounded to nearest even with integer operations on the float32 bits
  (`common.store_tile`), exact in the interpreter and on GPUs; float16 uses the plain cast.
"""

from __future__ import annotations

import torch

from gradq_fx.kernels import common
from gradq_fx.kernels.common import launches_triton, tile_config, tl, triton
from gradq_fx.kernels.int_mm import int8_gemm


def check_gemm_args(name, a, b, row_scale, col_scale, bias, out_dtype, batched: bool) -> None:
    """Raise ValueError, naming the argument, for inputs the scaled GEMM does not take."""
    dims = 3 if batched else 2
    common.check_tensor(name, "a", a, dims, (torch.int8,))
    common.check_tensor(name, "b", b, dims, (torch.int8,))
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"{name}: inner sizes differ, a {tuple(a.shape)} b {tuple(b.shape)}")
    if batched and a.shape[0] != b.shape[0]:
        raise ValueError(f"{name}: batch sizes differ, a {tuple(a.shape)} b {tuple(b.shape)}")
    batch = tuple(a.shape[:-2])
    common.check_scales(name, "row_scale", row_scale, (*batch, a.shape[-2]))
    common.check_scales(name, "col_scale", col_scale, (*batch, b.shape[-1]))
    common.check_epilogue(name, bias, b.shape[-1], out_dtype)
    tensors = {"a": a, "b": b, "row_scale": row_scale, "col_scale": col_scale, "bias": bias}
    common.check_devices(name, "a", tensors)


def _scaled_reference(a, b, row_scale, col_scale, bias, out_dtype) -> torch.Tensor:
    # quantizer.quantized_matmul's epilogue, in its order.
    out = int8_gemm(a, b).float() * row_scale[..., :, None] * col_scale[..., None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_scaled_mm_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`int8_scaled_mm` in torch (module docstring), exact int32 GEMM from `int_mm`."""
    check_gemm_args("int8_scaled_mm", a, b, row_scale, col_scale, bias, out_dtype, batched=False)
    return _scaled_reference(a, b, row_scale, col_scale, bias, out_dtype)


def int8_scaled_bmm_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`int8_scaled_bmm` in torch (module docstring), exact int32 GEMM from `int_mm`."""
    check_gemm_args("int8_scaled_bmm", a, b, row_scale, col_scale, bias, out_dtype, batched=True)
    return _scaled_reference(a, b, row_scale, col_scale, bias, out_dtype)


@torch.library.custom_op("gradq::int8_scaled_mm", mutates_args=())
def int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """a int8 [M, K] @ b int8 [K, N], dequantized in the epilogue (module docstring): [M, N].

    Triton on CUDA tensors and under TRITON_INTERPRET=1 (`common.launches_triton`), else
    `int8_scaled_mm_reference`.
    """
    if not launches_triton(a):
        return int8_scaled_mm_reference(a, b, row_scale, col_scale, bias, out_dtype)
    check_gemm_args("int8_scaled_mm", a, b, row_scale, col_scale, bias, out_dtype, batched=False)
    out = _launch(a[None], b[None], row_scale[None], col_scale[None], bias, out_dtype)
    return out[0]


@int8_scaled_mm.register_fake
def _(a, b, row_scale, col_scale, bias=None, out_dtype=torch.float32):
    check_gemm_args("int8_scaled_mm", a, b, row_scale, col_scale, bias, out_dtype, batched=False)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


@torch.library.custom_op("gradq::int8_scaled_bmm", mutates_args=())
def int8_scaled_bmm(
    a: torch.Tensor,
    b: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """a int8 [B, M, K] @ b int8 [B, K, N], dequantized in the epilogue: [B, M, N].

    Triton on CUDA tensors and under TRITON_INTERPRET=1, else `int8_scaled_bmm_reference`.
    """
    if not launches_triton(a):
        return int8_scaled_bmm_reference(a, b, row_scale, col_scale, bias, out_dtype)
    check_gemm_args("int8_scaled_bmm", a, b, row_scale, col_scale, bias, out_dtype, batched=True)
    return _launch(a, b, row_scale, col_scale, bias, out_dtype)


@int8_scaled_bmm.register_fake
def _(a, b, row_scale, col_scale, bias=None, out_dtype=torch.float32):
    check_gemm_args("int8_scaled_bmm", a, b, row_scale, col_scale, bias, out_dtype, batched=True)
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]), dtype=out_dtype)


def _launch(a, b, row_scale, col_scale, bias, out_dtype) -> torch.Tensor:
    """Launch the kernel on 3-D operands (a 2-D GEMM is a batch of one)."""
    batch, m, k = a.shape
    n = b.shape[2]
    out = torch.empty((batch, m, n), dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (batch * tiles,)

    _int8_scaled_mm_kernel[grid](
        a,
        b,
        row_scale,
        col_scale,
        bias if bias is not None else row_scale,  # unused placeholder when HAS_BIAS is False
        out,
        m,
        n,
        k,
        *a.stride(),
        *b.stride(),
        *row_scale.stride(),
        *col_scale.stride(),
        0 if bias is None else bias.stride(0),
        *out.stride(),
        HAS_BIAS=bias is not None,
        OUT_BF16=out_dtype == torch.bfloat16,
        enable_fp_fusion=False,  # keep the epilogue's multiply and add separately rounded
    )
    return out


if triton is not None:
    # int8 tensor-core tiles for CUDA (BLOCK_K >= 32 for the int8 MMA), small-M tiles last for
    # M <= 16 (decode-like shapes, tiny batches).
    # Tiles that ptxas (sm_90a) fits in registers without spilling under both Triton 3.6 (the
    # GPU machine's, with torch 2.11) and 3.8 (torch 2.14), which the CPU test
    # tests/kernels/test_cuda_compile.py checks with whichever is installed. Under 3.6,
    # 128x256x32 (8 warps), 64x256x64 (8 warps) and 64x128x64 (4 warps) spilled 208 to 444
    # bytes: 128x128x32, 64x256x32 and 64x128x64 at 8 warps took their places. Not timed yet
    # (no GPU).
    _CUDA_CONFIGS = [
        tile_config(128, 128, 64, stages=4, warps=8),
        tile_config(256, 64, 32, stages=4, warps=8),
        tile_config(128, 128, 32, stages=4, warps=8),
        tile_config(64, 256, 32, stages=4, warps=8),
        tile_config(64, 128, 64, stages=4, warps=8),
        tile_config(128, 64, 32, stages=4, warps=4),
        tile_config(64, 64, 64, stages=4, warps=4),
        tile_config(32, 64, 64, stages=4, warps=4),
        tile_config(16, 64, 64, stages=4, warps=4),
        tile_config(16, 128, 64, stages=4, warps=4),
    ]

    @common.autotune(
        ["M", "N", "K", "stride_ak", "stride_bn", "HAS_BIAS"],
        _CUDA_CONFIGS,
        common.GEMM_INTERPRETER_CONFIGS,
    )
    @triton.jit
    def _int8_scaled_mm_kernel(
        # pointers
        a_ptr,
        b_ptr,
        row_scale_ptr,
        col_scale_ptr,
        bias_ptr,
        out_ptr,
        # sizes
        M,
        N,
        K,
        # strides
        stride_ab,
        stride_am,
        stride_ak,
        stride_bb,
        stride_bk,
        stride_bn,
        stride_rb,
        stride_rm,
        stride_cb,
        stride_cn,
        stride_bias,
        stride_ob,
        stride_om,
        stride_on,
        # meta-parameters
        HAS_BIAS: tl.constexpr,
        OUT_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # One program per output tile, batches one after another; inside a batch, tiles in
        # grouped order (`common.grouped_tile`).
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        batch = (pid // (tiles_m * tiles_n)).to(tl.int64)
        pid_m, pid_n = common.grouped_tile(pid % (tiles_m * tiles_n), tiles_m, tiles_n, GROUP_M)

        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        a_ptrs = (
            a_ptr + batch * stride_ab + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        )
        b_ptrs = (
            b_ptr + batch * stride_bb + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        )

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for step in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - step * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        # Epilogue, in the reference's order: float32(acc) * row_scale * col_scale + bias.
        row_scale = tl.load(row_scale_ptr + batch * stride_rb + offs_m * stride_rm, mask=mask_m)
        col_scale = tl.load(col_scale_ptr + batch * stride_cb + offs_n * stride_cn, mask=mask_n)
        out = common.dequantize_tile(
            acc, row_scale, col_scale, bias_ptr, offs_n, stride_bias, mask_n, HAS_BIAS
        )
        out_ptrs = (
            out_ptr + batch * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        )
        common.store_tile(out_ptrs, out, mask_m[:, None] & mask_n[None, :], OUT_BF16)
