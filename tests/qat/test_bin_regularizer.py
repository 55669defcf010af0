"""The bin regularizer against a loop over bins, its schedule, and the oscillation tracker."""

from __future__ import annotations

import math

import pytest
import torch

from gradq_fx.qat import LSQQuantizer, OscillationTracker, bin_regularizer, obr_lambda


def loop_reference(weight, scale, bits):
    """The official code's dampening loss, one bin at a time, in float64 (autograd-able).

    weight [C, K] (or [K]); scale 0-dim, or [C, 1] for a step per row. Signed quantizer.
    """
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    weight, scale = weight.reshape(-1, weight.shape[-1]), scale.reshape(-1, 1)
    clipped = torch.minimum(torch.maximum(weight / scale, torch.tensor(low)), torch.tensor(high))
    clipped = clipped * scale
    code = torch.round(weight.detach() / scale.detach()).clamp(low, high)
    loss = ((code * scale.detach()) - clipped).square().mean()
    for row in range(weight.shape[0]):  # bins are per (row, level) with a step per row
        for level in range(low, high + 1):
            members = clipped[row][code[row] == level]
            if members.numel() > 1:
                loss = loss + members.var()  # unbiased, as the official code
    return loss


def case(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=gen) * 0.1
    weight.view(-1)[:3] = torch.tensor([0.9, -0.8, 0.0])  # two clipped, one on a level
    return weight


def test_bin_regularizer_matches_a_loop_over_bins():
    weight = case((37,), seed=0).requires_grad_()
    scale = torch.tensor(0.05, requires_grad=True)
    actual = bin_regularizer(weight, scale, bits=3)

    w64 = weight.detach().double().requires_grad_()
    s64 = scale.detach().double().requires_grad_()
    # One row: the loop treats the whole tensor as one group of bins.
    expected = loop_reference(w64[None, :], s64, 3)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-9)
    assert actual.dtype == torch.float32 and actual.shape == ()
    grads = torch.autograd.grad(actual, [weight, scale])
    expected_grads = torch.autograd.grad(expected, [w64, s64])
    for a, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-7)
    # Both terms matter: the bins' variances are most of it here.
    distance = (torch.round(w64 / s64).clamp(-4, 3) * s64 - w64.clamp(-0.2, 0.15)).square()
    assert 0 < distance.mean() < 0.5 * expected


def test_bin_regularizer_per_channel_bins():
    weight = case((3, 13), seed=1) * torch.tensor([[1.0], [0.3], [3.0]])
    scale = torch.tensor([[0.05], [0.02], [0.2]])
    actual = bin_regularizer(weight, scale, bits=2)
    expected = loop_reference(weight.double(), scale.double(), 2)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-9)
    # Not the same as pooling the rows' codes into shared bins.
    pooled = loop_reference(weight.double().reshape(1, -1), torch.tensor(0.05).double(), 2)
    assert not torch.isclose(actual.double(), pooled)


def test_bin_regularizer_through_a_quantizer_and_with_an_offset():
    weight = case((5, 7), seed=2)
    q = LSQQuantizer(4, "weight", channels=5)
    q.initialise(weight)
    value = bin_regularizer(weight, q.scale[:, None], q.bits)
    assert torch.isfinite(value) and value > 0
    # A weight exactly on its levels, one per bin: nothing to regularize.
    on_levels = torch.arange(-8.0, 8.0) * 0.25
    assert bin_regularizer(on_levels, torch.tensor(0.25), 4).item() == 0.0
    # The same with an offset (unsigned): shifted levels, still zero.
    shifted = torch.arange(0.0, 16.0) * 0.25 - 0.1
    assert bin_regularizer(shifted, torch.tensor(0.25), 4, torch.tensor(-0.1), False) < 1e-12


def test_obr_lambda_schedule():
    total = 1000
    assert obr_lambda(0, total) == 0.0
    assert obr_lambda(100, total) == 0.0
    assert obr_lambda(250, total) == 0.0
    # Half-way: a third of the way up the cosine, (1 - cos(pi / 3)) / 2 = 1/4 of the peak.
    assert obr_lambda(500, total) == pytest.approx(0.0025, rel=1e-12)
    assert obr_lambda(total, total) == pytest.approx(0.01, rel=1e-12)
    assert obr_lambda(total + 7, total) == pytest.approx(0.01, rel=1e-12)
    values = [obr_lambda(step, total) for step in range(total + 1)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert obr_lambda(625, total) == pytest.approx(0.005, rel=1e-12)  # the cosine's middle
    assert obr_lambda(3, 7, peak=1.0, start=0.0) == pytest.approx(
        (1 - math.cos(3 / 7 * math.pi)) / 2
    )
    for step, steps in ((-1, 10), (0, 0)):
        with pytest.raises(ValueError):
            obr_lambda(step, steps)


def test_oscillation_tracker_on_a_hand_built_sequence():
    tracker = OscillationTracker((2, 5))
    codes = torch.tensor([[0, 1, 2, 3, -4], [1, 1, 1, 1, 1]], dtype=torch.float32)
    assert tracker.update(codes).item() == 0.0  # nothing to compare with yet
    flipped = codes.clone()
    flipped[0, 1], flipped[1, 3], flipped[0, 4] = 2, 0, -3  # 3 of 10 change
    assert tracker.update(flipped).item() == pytest.approx(0.3)
    assert tracker.update(flipped).item() == 0.0
    assert tracker.update(flipped + 1).item() == 1.0
    # The epoch's mean over the three compared steps.
    assert tracker.epoch_fraction().item() == pytest.approx((0.3 + 0.0 + 1.0) / 3)
    assert tracker.epoch_fraction().item() == 0.0  # reset
    flipped[1, 0] = 255  # an unsigned 8-bit code
    assert tracker.update(flipped + 1).item() == pytest.approx(0.1)
    assert tracker.epoch_fraction(reset=False).item() == pytest.approx(0.1)
    assert tracker.state_dict() == {}  # logging state, not checkpointed
    with pytest.raises(ValueError, match="shapes"):
        tracker.update(torch.zeros(10))


def test_oscillation_tracker_follows_a_quantizer():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 9, generator=gen)
    q = LSQQuantizer(2, "weight")
    q.initialise(weight)
    tracker = OscillationTracker(weight.shape)
    tracker.update(q.codes(weight))
    step = q.scale.detach()
    codes = q.codes(weight)
    nudged = weight.clone()
    # Weight [0, 0] just across a rounding boundary into the next code, weight [1, 1] onto its
    # own level (same code), weight [2, 2] by a hair.
    code = codes[0, 0].item()
    nudged[0, 0] = (code + 0.51 if code < 1 else code - 0.51) * step
    nudged[1, 1] = codes[1, 1] * step
    nudged[2, 2] = weight[2, 2] * (1 + 1e-6)
    assert tracker.update(q.codes(nudged)).item() == pytest.approx(1 / 36)
    assert tracker.update(q.codes(weight)).item() == pytest.approx(1 / 36)  # and back
    assert tracker.epoch_fraction().item() == pytest.approx(1 / 36)
