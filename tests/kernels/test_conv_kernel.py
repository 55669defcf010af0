"""gradq_fx.kernels.conv (the Triton implicit-GEMM convolution) and the exact integer
convolutions of kernels/int_mm.py, against float64 F.conv2d and its autograd.

Tests marked `interpret` run the Triton kernel in Triton's CPU interpreter (see conftest.py);
the others check the integer convolutions, the launcher's torch path and its validation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradq_fx.config import Clipping, QuantSpec, Role
from gradq_fx.kernels.conv import int8_scaled_conv2d, int8_scaled_conv2d_reference
from gradq_fx.kernels.int_mm import (
    int8_conv2d,
    int8_conv2d_input_grad,
    int8_conv2d_weight_grad,
)
from gradq_fx.lowerings.reference import REFERENCE
from gradq_fx.lowerings.triton import TRITON
from tests.kernels.conftest import (
    OUT_DTYPES,
    assert_equal,
    interpret,
    needs_cuda,
    random_int8,
    random_scales,
)

# (batch, in channels, out channels, height, width, kernel, stride, padding): odd and prime
# sizes, stride 1 and 2, padding 0 and 1, a channel count past one 16-wide step, a 5x5 and a
# non-square kernel, the 3-channel stem.
GEOMETRIES = [
    (2, 5, 7, 7, 13, (3, 3), (1, 1), (1, 1)),
    (1, 3, 11, 13, 7, (3, 3), (2, 2), (1, 1)),
    (2, 17, 5, 7, 7, (3, 3), (2, 2), (0, 0)),
    (1, 19, 3, 13, 13, (3, 3), (1, 1), (0, 0)),
    (1, 2, 3, 9, 11, (5, 3), (2, 1), (2, 1)),
]


def operands(geometry, seed: int = 0):
    batch, c_in, c_out, height, width, kernel, _, _ = geometry
    x = random_int8(batch, c_in, height, width, seed=seed, low=-127)
    w = random_int8(c_out, c_in, *kernel, seed=seed + 1, low=-127)
    return x, w


def expected(x, w, x_scale, w_scale, stride, padding, bias, out_dtype):
    """The formula, written out over a float64 convolution (exact on these integers)."""
    acc = F.conv2d(x.double(), w.double(), None, stride, padding).to(torch.int32)
    out = acc.float() * x_scale[:, None, None, None] * w_scale[None, :, None, None]
    if bias is not None:
        out = out + bias.float()[:, None, None]
    return out.to(out_dtype)


# -- exact integer convolutions (the reference's core) ---------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_integer_convolutions_equal_float64_autograd(geometry):
    x, w = operands(geometry)
    stride, padding = geometry[6], geometry[7]
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    out64 = F.conv2d(x64, w64, None, stride, padding)
    dy = random_int8(*out64.shape, seed=7, low=-127)
    out64.backward(dy.double())

    out = int8_conv2d(x, w, stride, padding)
    dx = int8_conv2d_input_grad(dy, w, stride, padding, tuple(x.shape[2:]))
    dw = int8_conv2d_weight_grad(x, dy, stride, padding, tuple(w.shape[2:]))
    for got, want in ((out, out64), (dx, x64.grad), (dw, w64.grad)):
        assert got.dtype == torch.int32
        assert torch.equal(got.double(), want)


def test_integer_convolution_is_exact_past_float32_range():
    # 64 channels x 9 taps of 127 * 127 sum to 9.3e6 per output pixel; the weight gradient
    # of a 61 x 61 image sums 3721 products per channel pair to 6.0e7, past 2^24.
    x = torch.full((1, 64, 61, 61), 127, dtype=torch.int8)
    w = torch.full((2, 64, 3, 3), -127, dtype=torch.int8)
    out = int8_conv2d(x, w, (1, 1), (0, 0))
    assert torch.equal(out, torch.full_like(out, -64 * 9 * 127 * 127))
    dy = torch.full((1, 2, 59, 59), 127, dtype=torch.int8)
    dw = int8_conv2d_weight_grad(x, dy, (1, 1), (0, 0), (3, 3))
    assert torch.equal(dw, torch.full_like(dw, 59 * 59 * 127 * 127))


# -- the launcher's torch path and its validation --------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES[:2], ids=str)
def test_reference_matches_the_formula(geometry):
    x, w = operands(geometry, seed=3)
    x_scale, w_scale = random_scales(x.shape[0], seed=1), random_scales(w.shape[0], seed=2)
    bias = torch.randn(w.shape[0])
    stride, padding = geometry[6], geometry[7]
    out = int8_scaled_conv2d_reference(x, w, x_scale, w_scale, stride, padding, bias)
    assert_equal(out, expected(x, w, x_scale, w_scale, stride, padding, bias, torch.float32))
    assert out.is_contiguous()


BAD_ARGUMENTS = {
    "x": (dict(x=torch.zeros(1, 3, 5, 5)), "x must be a 4-D int8 tensor"),
    "w": (dict(w=torch.zeros(4, 3, 3, dtype=torch.int8)), "w must be a 4-D int8 tensor"),
    "channels": (dict(w=torch.zeros(4, 2, 3, 3, dtype=torch.int8)), "x has 3 channels"),
    "stride": (dict(stride=(0, 1)), "stride must be two positive ints"),
    "padding": (dict(padding=(1,)), "padding must be two non-negative ints"),
    "fit": (
        dict(padding=(0, 0), stride=(1, 1), w=torch.zeros(4, 3, 7, 7, dtype=torch.int8)),
        "does not fit the input",
    ),  # fmt: skip
    "x_scale": (dict(x_scale=torch.ones(2)), r"x_scale must have shape \(1,\)"),
    "w_scale": (dict(w_scale=torch.ones(4, dtype=torch.float64)), "w_scale must be a float32"),
    "bias": (dict(bias=torch.ones(3)), r"bias must have shape \(4,\)"),
    "out_dtype": (dict(out_dtype=torch.int32), "out_dtype must be float32, bfloat16 or float16"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_raise_value_errors_naming_them(case):
    arguments = dict(
        x=torch.zeros(1, 3, 5, 5, dtype=torch.int8),
        w=torch.zeros(4, 3, 3, 3, dtype=torch.int8),
        x_scale=torch.ones(1),
        w_scale=torch.ones(4),
        stride=(1, 1),
        padding=(1, 1),
        bias=None,
        out_dtype=torch.float32,
    )
    change, message = BAD_ARGUMENTS[case]
    arguments.update(change)
    for launcher in (int8_scaled_conv2d, int8_scaled_conv2d_reference):
        with pytest.raises(ValueError, match=message):
            launcher(**arguments)


def test_fake_impl_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 13, 7, dtype=torch.int8)
        w = torch.empty(11, 5, 3, 3, dtype=torch.int8)
        out = int8_scaled_conv2d(x, w, torch.empty(2), torch.empty(11), (2, 2), (1, 1))
    assert (
        out.shape == F.conv2d(torch.empty(2, 5, 13, 7), torch.empty(11, 5, 3, 3), None, 2, 1).shape
    )


# -- the Triton kernel, in the interpreter -------------------------------------------------


@interpret
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_kernel_bit_for_bit(geometry, out_dtype, bias):
    x, w = operands(geometry, seed=sum(geometry[:5]))
    x_scale, w_scale = random_scales(x.shape[0], seed=5), random_scales(w.shape[0], seed=6)
    bias = torch.randn(w.shape[0]).to(out_dtype) if bias else None
    stride, padding = geometry[6], geometry[7]
    out = int8_scaled_conv2d(x, w, x_scale, w_scale, stride, padding, bias, out_dtype)
    # Exact: integer sums, and the epilogue's float32 operations in the reference's order.
    assert_equal(out, expected(x, w, x_scale, w_scale, stride, padding, bias, out_dtype))


@interpret
@pytest.mark.parametrize("fill", [0, 127, -127], ids=["zeros", "max", "min"])
def test_kernel_extreme_inputs(fill):
    # All-zero input (codes of a zero image) and saturated codes everywhere, with an outlier
    # scale in one image.
    geometry = (2, 23, 5, 7, 13, (3, 3), (2, 2), (1, 1))
    x = torch.full((2, 23, 7, 13), fill, dtype=torch.int8)
    w = random_int8(5, 23, 3, 3, seed=11, low=-127)
    x_scale = torch.tensor([1e-3, 1e4])
    w_scale = random_scales(5, seed=12)
    stride, padding = geometry[6], geometry[7]
    out = int8_scaled_conv2d(x, w, x_scale, w_scale, stride, padding)
    assert_equal(out, expected(x, w, x_scale, w_scale, stride, padding, None, torch.float32))


@interpret
def test_kernel_reads_channels_last_and_strided_views():
    x, w = operands(GEOMETRIES[0], seed=21)
    x_scale, w_scale = random_scales(x.shape[0], seed=1), random_scales(w.shape[0], seed=2)
    want = expected(x, w, x_scale, w_scale, (1, 1), (1, 1), None, torch.float32)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert_equal(int8_scaled_conv2d(channels_last, w, x_scale, w_scale, (1, 1), (1, 1)), want)
    wide = torch.zeros(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3], dtype=torch.int8)
    wide[..., ::2] = x
    view = wide[..., ::2]
    assert_equal(int8_scaled_conv2d(view, w, x_scale, w_scale, (1, 1), (1, 1)), want)


CONV_SPECS = {
    "act": QuantSpec(),
    "weight": QuantSpec(),
    "grad": QuantSpec(clipping=Clipping.IQR),  # unscaled: bit-exact against the reference
}


@interpret
@pytest.mark.parametrize("role", ["forward", "dgrad", "wgrad"])
@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=str)
def test_conv_triton_matches_conv_reference(geometry, role):
    # The three roles of a dense convolution through the kernels (forward: implicit GEMM;
    # dgrad: the same kernel on zero-inserted dY; wgrad: the scaled GEMM on int8 patches)
    # against the reference numerics, float operands quantized on the way.
    batch, c_in, c_out, height, width, kernel, stride, padding = geometry
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(batch, c_in, height, width, generator=gen)
    w = torch.randn(c_out, c_in, *kernel, generator=gen)
    out_size = F.conv2d(x, w, None, stride, padding).shape[2:]
    dy = torch.randn(batch, c_out, *out_size, generator=gen)
    act, weight, grad = (CONV_SPECS[k] for k in ("act", "weight", "grad"))
    operands_by_role = {
        "forward": (x, w, torch.randn(c_out, generator=gen), out_size, act, weight),
        "dgrad": (dy, w, None, x.shape[2:], grad, weight),
        "wgrad": (x, dy, None, kernel, act, grad),
    }
    a, b, bias, size, a_spec, b_spec = operands_by_role[role]
    args = (a, b, bias, stride, padding, tuple(size), a_spec, b_spec, Role(role))
    assert_equal(TRITON.conv2d(*args), REFERENCE.conv2d(*args))


@needs_cuda
@pytest.mark.gpu
def test_kernel_on_cuda_bit_for_bit():
    for geometry in GEOMETRIES:
        x, w = operands(geometry, seed=41)
        x_scale, w_scale = random_scales(x.shape[0], seed=1), random_scales(w.shape[0], seed=2)
        stride, padding = geometry[6], geometry[7]
        want = expected(x, w, x_scale, w_scale, stride, padding, None, torch.float32)
        args = (x.cuda(), w.cuda(), x_scale.cuda(), w_scale.cuda(), stride, padding)
        assert_equal(int8_scaled_conv2d(*args).cpu(), want)
