"""gradq_fx.quantizer.lsq (LSQ fake quantization for low-bit QAT) against references written
here in float64. The gradient reference is the paper's STE written with detach tricks (value
of one expression, gradient of another), independently of the autograd.Function under test:
clipping by explicit masks, so the bounds count as clipped (LSQ's open inside), whatever
torch.clamp's gradient at its bounds.
"""

from __future__ import annotations

import math

import pytest
import torch

from gradq_fx import quantizer


def ref_lsq_bounds(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def ref_lsq_forward(x, scale, offset, bits, signed):
    """The float32 results of clamp(round((x - b) / s)) * s + b, from float64 arithmetic.

    Each float32 operation is one float64 operation rounded once to float32 (exact for the
    sums, products and quotients of float32 operands: 53 >= 2 * 24 + 2).
    """
    low, high = ref_lsq_bounds(bits, signed)
    x64, s64 = x.double(), scale.double()
    shifted = x64 if offset is None else (x64 - offset.double()).float().double()
    code = torch.round((shifted / s64).float().double()).clamp(low, high)
    out = (code * s64).float().double()
    return (out if offset is None else (out + offset.double()).float().double()), code


def ref_lsq_autograd(x, scale, offset, bits, signed, g):
    """The LSQ output in float64 whose autograd gradients are the paper's (x, s, offset)."""
    low, high = ref_lsq_bounds(bits, signed)
    s = scale * g + (scale - scale * g).detach()  # value s, gradient scaled by g
    v = (x if offset is None else x - offset) / s
    clipped = torch.where(v <= low, float(low), torch.where(v >= high, float(high), v))
    code = clipped + (torch.round(clipped) - clipped).detach()  # round, straight through
    out = code * s
    return out if offset is None else out + offset


def lsq_case(shape, bits, signed, per_channel, seed):
    """x with values exactly at both bounds, at zero, half-way between levels and beyond the
    range, and a power-of-two step (so the boundary values are exact); a random upstream grad."""
    gen = torch.Generator().manual_seed(seed)
    low, high = ref_lsq_bounds(bits, signed)
    scale = torch.tensor(0.25) if not per_channel else 2.0 ** -torch.randint(1, 5, (shape[0], 1))
    offset = None if signed else torch.tensor(-0.125)
    base = 0.0 if offset is None else offset.item()
    levels = torch.randint(low - 3, high + 4, shape, generator=gen).double()
    half = torch.randint(0, 2, shape, generator=gen).double() * 0.5
    jitter = (torch.rand(shape, generator=gen).double() - 0.5) * (
        torch.rand(shape, generator=gen) < 0.4
    )
    x = levels + half + jitter  # on levels, half-way between them, and anywhere
    x.view(-1)[:6] = torch.tensor([low, high, 0.0, low - 0.5, high + 0.5, 0.5]).double()
    x = (x * scale.double() + base).float()
    grad = torch.randn(shape, generator=gen)
    return x, scale.float(), offset, grad


LSQ_CASES = [
    (bits, signed, per_channel)
    for bits in (2, 3, 4, 8)
    for signed, per_channel in ((True, False), (True, True), (False, False))
]


@pytest.mark.parametrize(("bits", "signed", "per_channel"), LSQ_CASES, ids=str)
def test_lsq_forward_equals_formula(bits, signed, per_channel):
    x, scale, offset, _ = lsq_case((7, 13), bits, signed, per_channel, seed=bits)
    expected, code = ref_lsq_forward(x, scale, offset, bits, signed)
    out = quantizer.lsq_fake_quantize(x, scale, offset, bits=bits, signed=signed)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out.double(), expected)
    assert torch.equal(quantizer.lsq_codes(x, scale, offset, bits, signed).double(), code)
    low, high = ref_lsq_bounds(bits, signed)
    assert code.min() == low and code.max() == high  # both clamps exercised
    # Random steps and values: the same, up to ties that float32 rounding may break.
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 11, generator=gen) * 3
    scale = torch.tensor(0.0371) if not per_channel else torch.rand(3, 1, 1, generator=gen) + 0.1
    out = quantizer.lsq_fake_quantize(x, scale, offset, bits=bits, signed=signed)
    assert torch.equal(out.double(), ref_lsq_forward(x, scale, offset, bits, signed)[0])


@pytest.mark.parametrize(("bits", "signed", "per_channel"), LSQ_CASES, ids=str)
def test_lsq_gradients_match_the_paper(bits, signed, per_channel):
    x, scale, offset, grad = lsq_case((7, 13), bits, signed, per_channel, seed=10 + bits)
    g = torch.rand(scale.shape, generator=torch.Generator().manual_seed(bits)) + 0.05

    leaves = [x.clone().requires_grad_(), scale.clone().requires_grad_()]
    if offset is not None:
        leaves.append(offset.clone().requires_grad_())
    out = quantizer.lsq_fake_quantize(
        leaves[0], leaves[1], leaves[2] if offset is not None else None,
        bits=bits, signed=signed, grad_scale=g,
    )  # fmt: skip
    actual = torch.autograd.grad(out, leaves, grad)

    refs = [t.detach().double().requires_grad_() for t in leaves]
    ref_out = ref_lsq_autograd(
        refs[0], refs[1], refs[2] if offset is not None else None, bits, signed, g.double()
    )
    expected = torch.autograd.grad(ref_out, refs, grad.double())
    assert torch.equal(ref_out.detach(), out.detach().double())
    assert torch.equal(actual[0].double(), expected[0])  # 0 or the upstream gradient
    for a, e in zip(actual[1:], expected[1:], strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6)
    # The boundary values are clipped (no x gradient), zero and half-way ones are not.
    grad_x, upstream = actual[0].view(-1), grad.view(-1)
    assert grad_x[:2].eq(0).all()  # exactly at low and high
    assert grad_x[3:5].eq(0).all()  # beyond the range
    assert torch.equal(grad_x[5], upstream[5])  # half a step: inside
    if signed:
        assert torch.equal(grad_x[2], upstream[2])  # zero: inside


def test_lsq_gradient_in_bf16():
    x = torch.randn(5, 9, generator=torch.Generator().manual_seed(2)).bfloat16()
    x.requires_grad_()
    scale = torch.tensor(0.3, requires_grad=True)
    out = quantizer.lsq_fake_quantize(x, scale, bits=3)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and scale.grad.dtype == torch.float32


def test_lsq_bounds_and_bad_arguments():
    assert quantizer.lsq_bounds(2, True) == (-2, 1)
    assert quantizer.lsq_bounds(8, True) == (-128, 127)
    assert quantizer.lsq_bounds(3, False) == (0, 7)
    for bits in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits"):
            quantizer.lsq_bounds(bits, True)
    with pytest.raises(ValueError, match="unsigned"):
        quantizer.lsq_fake_quantize(torch.ones(3), torch.tensor(1.0), torch.tensor(0.0), bits=4)
    with pytest.raises(ValueError, match="grad_scale"):
        quantizer.lsq_fake_quantize(
            torch.ones(3, 2), torch.ones(3, 1), bits=4, grad_scale=torch.ones(2)
        )


def test_lsq_step_floor_is_straight_through():
    x = torch.tensor([0.5, -0.25])
    scale = torch.tensor(-1.0, requires_grad=True)  # an optimizer step overshot below zero
    out = quantizer.lsq_fake_quantize(x, scale, bits=4)
    assert torch.isfinite(out).all() and (out.abs() <= 8 * quantizer.LSQ_MIN_STEP).all()
    out.sum().backward()
    assert scale.grad.item() == 7 - 8  # clipped at high and low: Qp + (-Qn)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_weight_grad_scale_formula(bits, per_channel):
    w = torch.randn(5, 17, generator=torch.Generator().manual_seed(bits))
    w[2] = 0.0  # an all-zero channel
    qp = 2 ** (bits - 1) - 1
    g = quantizer.lsq_weight_grad_scale(w, bits, per_channel)
    if per_channel:
        total = w.double().abs().sum(dim=1)
        expected = torch.where(total > 0, 1 / (qp * total).sqrt(), 1.0)
    else:
        expected = 1 / (qp * w.double().abs().sum()).sqrt()
    assert g.shape == expected.shape and g.dtype == torch.float32
    torch.testing.assert_close(g.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("bits", "signed"), [(2, True), (4, False), (8, True)])
def test_lsq_activation_grad_scale_formula(bits, signed):
    qp = ref_lsq_bounds(bits, signed)[1]
    g = quantizer.lsq_activation_grad_scale(torch.empty(3, 7, 11), bits, signed)
    assert g == pytest.approx(1 / math.sqrt(3 * 7 * 11 * qp), rel=1e-12)


def _gaussian_with_outliers(shape, seed):
    """Unit Gaussian values and five outliers at 8 to 12 standard deviations."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen)
    index = torch.randperm(w.numel(), generator=gen)[:5]
    w.view(-1)[index] = torch.tensor([8.0, -9.0, 10.0, -11.0, 12.0])
    return w


def ref_mse(w, scale, bits):
    low, high = ref_lsq_bounds(bits, True)
    w64, s64 = w.double(), scale.double()
    return (torch.round(w64 / s64).clamp(low, high) * s64 - w64).square().mean().item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_weight_init_is_an_mse_fixed_point_better_than_absmax(bits):
    w = _gaussian_with_outliers((37, 61), seed=bits)
    low, high = ref_lsq_bounds(bits, True)
    scale = quantizer.lsq_init_weight_scale(w, bits)
    assert scale.shape == () and scale.dtype == torch.float32
    # A fixed point: the least-squares step for its own codes is itself.
    code = torch.round(w.double() / scale.double()).clamp(low, high)
    refit = (w.double() * code).sum() / (code * code).sum()
    torch.testing.assert_close(refit, scale.double(), rtol=1e-6, atol=0)
    # And it fits as well as the best step of a fine grid (3,000 steps from absmax / Qp down
    # to 0.3% of it, float64), far better than absmax at low bits. Measured over 4 seeds:
    # within 0.1% of the grid's best at 2, 3, 4 and 8 bits (absmax: 3.2x, 5x, 2.7x, 1.03x).
    absmax = w.abs().max().item() / high
    grid = [absmax * f for f in torch.logspace(-2.5, 0.05, 3000).tolist()]
    best = min(ref_mse(w, torch.tensor(step), bits) for step in grid)
    assert ref_mse(w, scale, bits) <= 1.01 * best
    if bits < 8:
        assert ref_mse(w, torch.tensor(absmax), bits) > 2 * best  # the test can tell


def test_lsq_weight_init_per_channel():
    w = _gaussian_with_outliers((7, 33), seed=5) * torch.logspace(-2, 1, 7)[:, None]
    w[4] = 0.0
    scale = quantizer.lsq_init_weight_scale(w, 3, per_channel=True)
    assert scale.shape == (7,)
    assert scale[4] == 1.0  # all-zero channel
    for row in (0, 1, 2, 3, 5, 6):
        torch.testing.assert_close(scale[row], quantizer.lsq_init_weight_scale(w[row], 3))


@pytest.mark.parametrize(("bits", "signed"), [(2, True), (3, False), (4, False), (8, True)])
def test_lsq_activation_init(bits, signed):
    x = torch.randn(4, 9, 13, generator=torch.Generator().manual_seed(bits)) * 2 + 0.3
    qp = ref_lsq_bounds(bits, signed)[1]
    scale = quantizer.lsq_init_activation_scale(x, bits, signed)
    expected = 2 * x.double().abs().mean() / math.sqrt(qp)
    torch.testing.assert_close(scale.double(), expected, rtol=1e-6, atol=0)
    assert quantizer.lsq_init_activation_scale(torch.zeros(3), bits, signed).item() == 1.0
