"""gradq_fx.ops in eager mode: the gradq.mm custom op (its schema, fake and reference)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import gradq_fx  # noqa: F401  (registers torch.ops.gradq.*)
from gradq_fx import quantizer
from gradq_fx.config import Clipping, Granularity, QuantSpec, Rounding

ACT = QuantSpec()  # 8 bits, per_row, nearest, minmax
WEIGHT = QuantSpec()
GRAD = QuantSpec(clipping=Clipping.IQR)
GRAD_STOCHASTIC = QuantSpec(rounding=Rounding.STOCHASTIC, clipping=Clipping.IQR)
PT = Granularity.PER_TENSOR
ACT_PT = QuantSpec(granularity=PT)


def sqnr64(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return quantizer.sqnr_db(reference, approximation)


# --------------------------------------------------------------------------- gradq.mm


MM_CASES = [
    ((197, 64), (64, 37), True),
    ((2, 3, 197, 16), (2, 3, 16, 197), False),
    ((13, 7), (7, 5), True),
]
MM_SPECS = [
    (ACT, WEIGHT),
    (ACT_PT, QuantSpec(bits=4)),
    (GRAD, ACT),
    (QuantSpec(bits=6, granularity=PT, clipping=Clipping.IQR), ACT_PT),
]


@pytest.mark.parametrize(("shape_a", "shape_b", "with_bias"), MM_CASES, ids=str)
@pytest.mark.parametrize(("spec_a", "spec_b"), MM_SPECS, ids=lambda s: s.encode())
def test_gradq_mm_equals_quantizer(shape_a, shape_b, with_bias, spec_a, spec_b):
    torch.manual_seed(0)
    a, b = torch.randn(shape_a), torch.randn(shape_b)
    bias = torch.randn(shape_b[-1]) if with_bias else None
    out = torch.ops.gradq.mm(a, b, bias, spec_a.encode(), spec_b.encode(), "forward", "AW", "m")
    expected = quantizer.quantized_matmul(a, b, spec_a, spec_b, bias)
    assert out.dtype == expected.dtype
    assert torch.equal(out, expected)
    # And it really is quantized: not the float product.
    float_out = a @ b if bias is None else a @ b + bias
    assert not torch.allclose(out, float_out, rtol=1e-5, atol=1e-5)


def test_gradq_mm_stochastic_equals_quantizer_under_same_seed():
    torch.manual_seed(1)
    a, b = torch.randn(31, 16), torch.randn(16, 9)
    spec = GRAD_STOCHASTIC
    torch.manual_seed(5)
    out = torch.ops.gradq.mm(a, b, None, spec.encode(), spec.encode(), "dgrad", "GW", "m")
    torch.manual_seed(5)
    expected = quantizer.quantized_matmul(a, b, spec, spec)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(("shape_a", "shape_b", "with_bias"), MM_CASES, ids=str)
def test_gradq_mm_float_specs_equal_matmul(shape_a, shape_b, with_bias):
    torch.manual_seed(2)
    a, b = torch.randn(shape_a), torch.randn(shape_b)
    bias = torch.randn(shape_b[-1]) if with_bias else None
    out = torch.ops.gradq.mm(a, b, bias, "", "", "wgrad", "AG", "m")
    expected = torch.matmul(a, b)
    if bias is not None:
        expected = expected + bias
    assert torch.equal(out, expected)


def test_gradq_mm_bf16():
    torch.manual_seed(3)
    a, b = torch.randn(40, 24).bfloat16(), torch.randn(24, 8).bfloat16()
    out = torch.ops.gradq.mm(a, b, None, ACT.encode(), WEIGHT.encode(), "forward", "AW", "m")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, quantizer.quantized_matmul(a, b, ACT, WEIGHT))


@pytest.mark.parametrize(
    ("shape_a", "shape_b", "with_bias", "spec", "dtype"),
    [
        ((197, 64), (64, 37), True, ACT.encode(), torch.float32),
        ((197, 64), (64, 37), True, "", torch.float32),
        ((2, 3, 19, 16), (2, 3, 16, 19), False, GRAD.encode(), torch.float32),
        ((19, 16), (16, 5), True, ACT.encode(), torch.bfloat16),
    ],
    ids=["quantized", "float", "batched", "bf16"],
)
def test_gradq_mm_fake_matches_real(shape_a, shape_b, with_bias, spec, dtype):
    torch.manual_seed(4)
    a, b = torch.randn(shape_a, dtype=dtype), torch.randn(shape_b, dtype=dtype)
    bias = torch.randn(shape_b[-1], dtype=dtype) if with_bias else None
    torch.library.opcheck(
        torch.ops.gradq.mm.default,
        (a, b, bias, spec, spec, "forward", "AW", "m"),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize(
    ("role", "operands", "match"),
    [("backward", "GW", "role"), ("dgrad", "GX", "operands"), ("dgrad", "G", "operands")],
)
@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
def test_gradq_mm_rejects_unknown_labels(role, operands, match, fake):
    mode = torch._subclasses.FakeTensorMode() if fake else contextlib.nullcontext()
    with pytest.raises(ValueError, match=match), mode:
        a, b = torch.randn(3, 4), torch.randn(4, 5)
        torch.ops.gradq.mm(a, b, None, "", "", role, operands, "m")
