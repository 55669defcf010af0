"""gradq_fx.kernels.gemm: the Triton INT8 GEMM with its dequantize epilogue, against torch.

Tests marked `interpret` run the Triton kernel in Triton's CPU interpreter (see conftest.py);
the others check the launchers' torch path, validation and registration; `gpu` tests run the
compiled kernel on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from gradq_fx import quantizer
from gradq_fx.config import Clipping, QuantSpec
from gradq_fx.kernels import triton_interpreting
from gradq_fx.kernels.gemm import (
    int8_scaled_bmm,
    int8_scaled_bmm_reference,
    int8_scaled_mm,
    int8_scaled_mm_reference,
)
from gradq_fx.kernels.int_mm import int8_gemm
from gradq_fx.kernels.quantize import quantize_rows
from tests.kernels.conftest import (
    OUT_DTYPES,
    assert_equal,
    interpret,
    needs_cuda,
    random_int8,
    random_scales,
)

# (M, K, N): M <= 16 and just above, primes, a ViT token count, K past several 16-wide tiles
# and not a multiple of them, K long enough that sums pass 2^24.
MKN = [(1, 7, 3), (5, 13, 37), (16, 64, 16), (17, 33, 5), (197, 61, 37), (24, 1031, 9)]


def expected(a, b, row_scale, col_scale, bias, out_dtype):
    """The kernel's formula, written out: float32(a @ b) * rs * cs (+ bias), then the cast."""
    out = int8_gemm(a, b).float() * row_scale[..., :, None] * col_scale[..., None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# -- the Triton kernel, in the interpreter -------------------------------------------------


@interpret
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize(("m", "k", "n"), MKN, ids=str)
def test_kernel_mm_bit_for_bit(m, k, n, out_dtype, bias):
    a = random_int8(m, k, seed=m * k)
    b = random_int8(k, n, seed=k * n + 1)
    row_scale, col_scale = random_scales(m, seed=m), random_scales(n, seed=n + 1)
    bias = torch.randn(n).to(out_dtype) if bias else None
    out = int8_scaled_mm(a, b, row_scale, col_scale, bias, out_dtype)
    # Exact: the kernel's epilogue does the same float32 operations in the same order.
    assert_equal(out, expected(a, b, row_scale, col_scale, bias, out_dtype))


@interpret
@pytest.mark.parametrize(("va", "vb"), [(-128, -128), (127, -128), (127, 127)])
def test_kernel_mm_extreme_values(va, vb):
    k = 1031  # |acc| up to 1031 * 2^14 > 2^24: the int -> float conversion rounds
    a = torch.full((17, k), va, dtype=torch.int8)
    b = torch.full((k, 5), vb, dtype=torch.int8)
    ones_m, ones_n = torch.ones(17), torch.ones(5)
    out = int8_scaled_mm(a, b, ones_m, ones_n, None, torch.float32)
    assert (out == float(k * va * vb)).all()
    mixed = random_int8(17, k, seed=1)
    out = int8_scaled_mm(mixed, b, ones_m, ones_n, None, torch.float32)
    assert_equal(out, expected(mixed, b, ones_m, ones_n, None, torch.float32))


@interpret
def test_kernel_mm_zero_rows_and_columns():
    a = random_int8(13, 37, seed=2)
    a[4] = 0
    b = random_int8(37, 11, seed=3)
    b[:, 7] = 0
    row_scale, col_scale = random_scales(13, seed=4), random_scales(11, seed=5)
    out = int8_scaled_mm(a, b, row_scale, col_scale, None, torch.float32)
    assert_equal(out, expected(a, b, row_scale, col_scale, None, torch.float32))
    assert (out[4] == 0).all() and (out[:, 7] == 0).all()


@interpret
def test_kernel_mm_strided_operands():
    # a column-major, b a transposed view, scales and bias with strides: no copies needed.
    a = random_int8(37, 13, seed=6).t()
    b = random_int8(29, 80, seed=7)[:, ::2].t()[:37]  # [37, 29] with strides (2, 80)
    row_scale = random_scales(26, seed=8)[::2]
    col_scale = random_scales(29, seed=9)
    bias = torch.randn(58)[::2]
    out = int8_scaled_mm(a, b, row_scale, col_scale, bias, torch.bfloat16)
    assert out.is_contiguous()
    assert_equal(out, expected(a, b, row_scale, col_scale, bias, torch.bfloat16))


@interpret
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("batch", "m", "k", "n"),
    [(3, 17, 13, 5), (2, 1, 7, 3), (2, 197, 16, 29), (4, 5, 64, 7)],
    ids=str,
)
def test_kernel_bmm_bit_for_bit(batch, m, k, n, out_dtype):
    a = random_int8(batch, m, k, seed=m + k)
    b = random_int8(batch, k, n, seed=k + n)
    row_scale = random_scales(batch, m, seed=batch)
    col_scale = random_scales(batch, n, seed=batch + 1)
    bias = torch.randn(n) if out_dtype == torch.float32 else None
    out = int8_scaled_bmm(a, b, row_scale, col_scale, bias, out_dtype)
    assert_equal(out, expected(a, b, row_scale, col_scale, bias, out_dtype))


@interpret
def test_kernel_bmm_broadcast_operand():
    # Attention's K^T shared across a batch dimension arrives as an expanded (stride 0) view.
    a = random_int8(3, 13, 37, seed=10)
    b = random_int8(37, 11, seed=11).expand(3, -1, -1)
    row_scale = random_scales(3, 13, seed=12)
    col_scale = random_scales(11, seed=13).expand(3, -1)
    out = int8_scaled_bmm(a, b, row_scale, col_scale, None, torch.float32)
    assert_equal(out, expected(a, b.contiguous(), row_scale, col_scale, None, torch.float32))


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("m", "k", "n"), [(13, 37, 29), (197, 61, 37)], ids=str)
def test_kernels_reproduce_quantized_matmul(m, k, n, dtype):
    # The whole quantized GEMM through the kernels: a per row (IQR clip, as for gradients),
    # b per column (its columns read as rows of b.t(), codes written back in b's layout).
    gen = torch.Generator().manual_seed(m + n)
    a = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    a[1] = 0
    b = torch.randn(k, n, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    a_spec, b_spec = QuantSpec(clipping=Clipping.IQR), QuantSpec()
    q_a, s_a = quantize_rows(a, quantizer.clip_value(a.float(), a_spec))
    q_b, s_b = quantize_rows(b.t(), transpose=True)
    out = int8_scaled_mm(q_a, q_b, s_a, s_b, bias, dtype)
    assert_equal(out, quantizer.quantized_matmul(a, b, a_spec, b_spec, bias))


@interpret
def test_kernel_inside_torch_compile():
    a, b = random_int8(13, 37, seed=14), random_int8(37, 11, seed=15)
    row_scale, col_scale = random_scales(13, seed=16), random_scales(11, seed=17)

    def fn(a, b, row_scale, col_scale):
        return torch.ops.gradq.int8_scaled_mm(a, b, row_scale, col_scale, None, torch.bfloat16)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert_equal(compiled(a, b, row_scale, col_scale), fn(a, b, row_scale, col_scale))


@interpret
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_kernel_nan_scales_make_their_rows_and_columns_nan(out_dtype):
    # A NaN scale is how a quantized operand says its slice held a NaN or an Inf: the
    # epilogue must carry it to every output the slice feeds, and nowhere else.
    a, b = random_int8(17, 33, seed=1), random_int8(33, 5, seed=2)
    row_scale, col_scale = random_scales(17, seed=3), random_scales(5, seed=4)
    row_scale[3] = col_scale[2] = float("nan")
    out = int8_scaled_mm(a, b, row_scale, col_scale, None, out_dtype)
    nan = torch.zeros(17, 5, dtype=torch.bool)
    nan[3, :] = nan[:, 2] = True
    assert torch.isnan(out[nan]).all() and torch.isfinite(out[~nan]).all()
    assert_equal(out[~nan], expected(a, b, row_scale, col_scale, None, out_dtype)[~nan])


# -- the launchers' torch path, validation, registration -----------------------------------


def test_reference_matches_quantized_matmul_epilogue():
    a, b = random_int8(13, 37, seed=18), random_int8(37, 11, seed=19)
    row_scale, col_scale = random_scales(13, seed=20), random_scales(11, seed=21)
    bias = torch.randn(11).bfloat16()
    want = expected(a, b, row_scale, col_scale, bias, torch.bfloat16)
    assert_equal(int8_scaled_mm_reference(a, b, row_scale, col_scale, bias, torch.bfloat16), want)
    a3, b3 = a.expand(2, -1, -1), b.expand(2, -1, -1)
    rs3, cs3 = row_scale.expand(2, -1), col_scale.expand(2, -1)
    out3 = int8_scaled_bmm_reference(a3, b3, rs3, cs3, bias, torch.bfloat16)
    assert_equal(out3, want.expand(2, -1, -1))


def test_launchers_without_interpreter_run_the_reference():
    if triton_interpreting():
        pytest.skip("this process runs the Triton kernel on CPU tensors")
    a, b = random_int8(5, 7, seed=22), random_int8(7, 3, seed=23)
    rs, cs = random_scales(5, seed=24), random_scales(3, seed=25)
    assert_equal(int8_scaled_mm(a, b, rs, cs), int8_scaled_mm_reference(a, b, rs, cs))
    a3, b3, rs3, cs3 = a[None], b[None], rs[None], cs[None]
    assert_equal(int8_scaled_bmm(a3, b3, rs3, cs3), int8_scaled_bmm_reference(a3, b3, rs3, cs3))


def test_registered_ops_trace_with_symbolic_sizes():
    def fn(a, b, rs, cs, bias):
        out = torch.ops.gradq.int8_scaled_mm(a, b, rs, cs, bias, torch.float16)
        out3 = torch.ops.gradq.int8_scaled_bmm(a[None], b[None], rs[None], cs[None], None)
        return out.float() + out3[0]

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for m, k, n in [(5, 7, 3), (17, 13, 11)]:
        args = (random_int8(m, k, seed=m), random_int8(k, n, seed=n))
        args += (random_scales(m, seed=k), random_scales(n, seed=k + 1), torch.randn(n).half())
        assert_equal(compiled(*args), fn(*args))


_a, _b = torch.zeros(4, 6, dtype=torch.int8), torch.zeros(6, 5, dtype=torch.int8)
_rs, _cs = torch.ones(4), torch.ones(5)
INVALID_MM = [
    (dict(a=_a.float()), "a must be a 2-D int8"),
    (dict(b=_b.to(torch.uint8)), "b must be a 2-D int8"),
    (dict(a=_a[None]), "a must be a 2-D int8"),
    (dict(b=torch.zeros(7, 5, dtype=torch.int8)), "inner sizes differ"),
    (dict(row_scale=torch.ones(4, dtype=torch.float64)), "row_scale must be a float32"),
    (dict(row_scale=torch.ones(5)), r"row_scale must have shape \(4,\)"),
    (dict(col_scale=torch.ones(5, 1)), r"col_scale must have shape \(5,\)"),
    (dict(bias=torch.ones(5, dtype=torch.int32)), "bias must be a float"),
    (dict(bias=torch.ones(4)), r"bias must have shape \(5,\)"),
    (dict(out_dtype=torch.int32), "out_dtype must be float32"),
    (dict(col_scale=torch.ones(5, device="meta")), "col_scale is on meta"),
    (dict(bias=torch.ones(5, device="meta")), "bias is on meta"),
]


@pytest.mark.parametrize(("kwargs", "match"), INVALID_MM, ids=[m for _, m in INVALID_MM])
@pytest.mark.parametrize("fn", [int8_scaled_mm, int8_scaled_mm_reference], ids=["op", "reference"])
def test_mm_invalid_inputs_raise_value_error(fn, kwargs, match):
    kwargs = {"a": _a, "b": _b, "row_scale": _rs, "col_scale": _cs, **kwargs}
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)


INVALID_BMM = [
    (dict(a=_a), "a must be a 3-D int8"),
    (dict(b=torch.zeros(3, 6, 5, dtype=torch.int8)), "batch sizes differ"),
    (dict(row_scale=_rs), r"row_scale must have shape \(2, 4\)"),
    (dict(col_scale=torch.ones(1, 5)), r"col_scale must have shape \(2, 5\)"),
]


@pytest.mark.parametrize(("kwargs", "match"), INVALID_BMM, ids=[m for _, m in INVALID_BMM])
@pytest.mark.parametrize(
    "fn", [int8_scaled_bmm, int8_scaled_bmm_reference], ids=["op", "reference"]
)
def test_bmm_invalid_inputs_raise_value_error(fn, kwargs, match):
    valid = {"a": _a.expand(2, -1, -1), "b": _b.expand(2, -1, -1)}
    valid.update(row_scale=_rs.expand(2, -1), col_scale=_cs.expand(2, -1))
    with pytest.raises(ValueError, match=match):
        fn(**{**valid, **kwargs})


# -- the compiled kernel on CUDA -----------------------------------------------------------

# ViT-B linear shapes at 2 images (M = 394 tokens): forward, dgrad and wgrad contractions.
CUDA_MKN = MKN + [(394, 768, 2304), (394, 3072, 768), (768, 394, 3072), (4096, 4096, 4096)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize(("m", "k", "n"), CUDA_MKN, ids=str)
def test_cuda_kernel_mm_bit_for_bit(m, k, n, out_dtype):
    a = random_int8(m, k, seed=m).cuda()
    b = random_int8(k, n, seed=n).cuda()
    row_scale = random_scales(m, seed=k).cuda()
    col_scale = random_scales(n, seed=k + 1).cuda()
    bias = torch.randn(n, device="cuda").to(out_dtype)
    out = int8_scaled_mm(a, b, row_scale, col_scale, bias, out_dtype)
    assert out.is_cuda
    # enable_fp_fusion=False keeps the epilogue's multiply and add separately rounded.
    assert_equal(out, expected(a, b, row_scale, col_scale, bias, out_dtype))
    # The column-major b cuBLAS prefers, and a transposed a, give the same bits.
    b_col = b.t().contiguous().t()
    out = int8_scaled_mm(a.t().contiguous().t(), b_col, row_scale, col_scale, bias, out_dtype)
    assert_equal(out, expected(a, b, row_scale, col_scale, bias, out_dtype))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("batch", "m", "k", "n"), [(3, 17, 13, 5), (24, 197, 64, 197), (24, 197, 197, 64)], ids=str
)
def test_cuda_kernel_bmm_bit_for_bit(batch, m, k, n):
    a = random_int8(batch, m, k, seed=m).cuda()
    b = random_int8(batch, k, n, seed=n).cuda()
    row_scale = random_scales(batch, m, seed=k).cuda()
    col_scale = random_scales(batch, n, seed=k + 1).cuda()
    out = int8_scaled_bmm(a, b, row_scale, col_scale, None, torch.bfloat16)
    assert_equal(out, expected(a, b, row_scale, col_scale, None, torch.bfloat16))


@pytest.mark.gpu
@needs_cuda
def test_cuda_kernels_reproduce_quantized_matmul():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(394, 768, generator=gen).bfloat16().cuda()
    b = torch.randn(768, 2304, generator=gen).bfloat16().cuda()
    bias = torch.randn(2304, generator=gen).bfloat16().cuda()
    q_a, s_a = quantize_rows(a)
    q_b, s_b = quantize_rows(b.t(), transpose=True)
    out = int8_scaled_mm(q_a, q_b, s_a, s_b, bias, torch.bfloat16)
    assert_equal(out, quantizer.quantized_matmul(a, b, QuantSpec(), QuantSpec(), bias))
