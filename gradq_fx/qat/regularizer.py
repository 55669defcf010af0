"""The oscillation-aware bin regularizer, its weight schedule, and an oscillation measure.

Quantization Variation (docs/method.md): weights near a rounding boundary flip between two
levels from step to step, and low-bit training suffers for it. The regularizer pulls every
weight towards its level and every bin's weights together; its weight lambda is 0 for the
first quarter of training and then rises on a cosine to 0.01. The tracker measures what it
fights: the fraction of weights whose integer code changed since the previous step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradq_fx import quantizer

OBR_PEAK = 0.01  # lambda at the end of training (docs/method.md)
OBR_START = 0.25  # the fraction of training with lambda = 0 (docs/method.md)


def bin_regularizer(
    weight: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    offset: torch.Tensor | None = None,
    signed: bool = True,
) -> torch.Tensor:
    """mean((w_q - w_c)^2) + sum over bins of the variance of w_c in the bin (float32 scalar).

    Follows the official code's `dampening_loss`:
    - w_c is the weight clipped to the quantizer's range (`quantizer.lsq_clipped`), so clipped
      weights sit on the end levels; w_q = code * s + offset is detached (the target).
    - A bin is the set of weights sharing one integer code under one step size: with a
      per-channel scale ([C, 1] for a [C, K] weight) bins are per (channel, code).
    - Each bin's variance is the unbiased one (divided by n - 1, as torch.var); bins with fewer
      than two weights add nothing; the bins' variances are summed, unweighted by their
      populations. So a sparsely populated outer bin weighs as much as the central one: the
      outer bins are where weights flip between the largest levels.
    The gradient reaches the weights, and the step size (and offset) through the clipped
    weights only (w_c = w inside the range). Computed with two scatter passes (bin means, then
    squared deviations), not a loop over bins, and not as E[w^2] - E[w]^2, which cancels
    catastrophically in the outer bins at 8 bits.
    """
    clipped = quantizer.lsq_clipped(weight, scale, offset, bits, signed)
    codes = quantizer.lsq_codes(weight, scale, offset, bits, signed)
    target_offset = None if offset is None else offset.detach()
    restored = quantizer.lsq_fake_quantize(
        weight.detach(), scale.detach(), target_offset, bits=bits, signed=signed
    ).float()
    distance = (restored - clipped).square().mean()

    low, high = quantizer.lsq_bounds(bits, signed)
    levels = high - low + 1
    # One bin index per weight: (step-size group, code). Groups are the scale's slices.
    group = torch.arange(scale.numel(), device=weight.device).reshape(scale.shape)
    bins = (group.expand_as(codes) * levels + (codes - low).long()).reshape(-1)
    values = clipped.reshape(-1)
    count = torch.zeros(scale.numel() * levels, device=weight.device)
    count.index_add_(0, bins, torch.ones_like(values))
    total = torch.zeros_like(count).index_add(0, bins, values)
    mean = total / count.clamp_min(1.0)
    deviation = (values - mean[bins]).square()
    # Each weight's share of its bin's unbiased variance; zero in bins of one weight.
    denominator = (count - 1.0)[bins]
    share = torch.where(denominator > 0, deviation / denominator.clamp_min(1.0), 0.0)
    return distance + share.sum()


def obr_lambda(
    step: int, total_steps: int, peak: float = OBR_PEAK, start: float = OBR_START
) -> float:
    """The regularizer's weight at `step` of `total_steps`: 0 until start * total_steps, then
    peak * (1 - cos(pi * r)) / 2 with r the fraction of the remaining steps done (0 to 1).

    The official code (CosineTempDecay with range (0, 0.01), start 0.25) updates it per epoch;
    here per step, which is the same curve sampled finer. Steps past the end keep the peak.
    """
    if total_steps <= 0 or step < 0:
        raise ValueError(f"need 0 <= step and total_steps > 0, got {step!r}, {total_steps!r}")
    if not 0.0 <= start < 1.0:
        raise ValueError(f"start must be in [0, 1), got {start!r}")
    progress = min(step / total_steps, 1.0)
    if progress <= start:
        return 0.0
    ramp = (progress - start) / (1.0 - start)
    return peak * 0.5 * (1.0 - math.cos(math.pi * ramp))


class OscillationTracker(nn.Module):
    """The fraction of a weight's integer codes that changed since the previous `update`.

    `update(codes)` returns that fraction (0 on the first call, which has nothing to compare
    with and is not counted) and accumulates it; `epoch_fraction()` returns the mean over the
    updates since the last reset: one number per weight per epoch for the log. Codes come from
    `LSQQuantizer.codes` (integers up to 255: stored as int16). The state is logging state, not
    model state: its buffers are not saved in checkpoints, so a resumed run starts comparing
    afresh. No host sync: every result is a tensor.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...]):
        super().__init__()
        self.register_buffer("previous", torch.zeros(shape, dtype=torch.int16), persistent=False)
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool), persistent=False)
        self.register_buffer("fraction_sum", torch.zeros(()), persistent=False)
        self.register_buffer("updates", torch.zeros(()), persistent=False)

    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.shape != self.previous.shape:
            shapes = f"{tuple(codes.shape)} and {tuple(self.previous.shape)}"
            raise ValueError(f"codes and tracker shapes differ: {shapes}")
        codes = codes.to(torch.int16)
        changed = (codes != self.previous).float().mean()
        fraction = torch.where(self.has_previous, changed, 0.0)
        self.fraction_sum.add_(fraction)
        self.updates.add_(self.has_previous.float())
        self.previous.copy_(codes)
        self.has_previous.fill_(True)
        return fraction

    @torch.no_grad()
    def epoch_fraction(self, reset: bool = True) -> torch.Tensor:
        """Mean changed fraction per update since the last reset (0 if none was counted)."""
        mean = self.fraction_sum / self.updates.clamp_min(1.0)
        if reset:
            self.fraction_sum.zero_()
            self.updates.zero_()
        return mean
