"""LSQ: learned step size fake quantization for 2- to 8-bit QAT, as the Quantization
Variation paper's official code uses it (docs/method.md, Low-bit QAT):

  v    = (x - offset) / s                      offset only for unsigned quantizers
  code = clamp(round(v), low, high)            round half to even, as everywhere here
  x_q  = code * s + offset

Integer range. Signed: low = -2^(b-1), high = 2^(b-1) - 1 (two's complement), as LSQ and the
official code use; unlike the INT8 GEMM path's symmetric [-qmax, qmax]. At 2 bits the
symmetric range keeps 3 of 4 levels ({-1, 0, 1}), a quarter of the grid lost where every
level counts; negation exactness (why the INT8 path drops -128) does not matter for a
fake-quantized float GEMM, and the codes still fit in int8 at 8 bits. Unsigned (post-GELU
activations): low = 0, high = 2^b - 1, with a learnable offset that the code subtracts before
and adds back after quantizing (the official code's form), so GELU's negative tail (down to
-0.17) has a level. LSQ's Qp is `high`; its Qn is -low.

Gradients (straight-through, LSQ's equation 3):
  dx_q/dx      = 1 if low < v < high else 0
  dx_q/ds      = round(v) - v if low < v < high, low if v <= low, high if v >= high; times
                 the gradient scale g
  dx_q/doffset = 0 inside, 1 outside (not scaled by g: the official code leaves it unscaled)
The inside is open, as in the LSQ paper: v exactly at low or high counts as clipped. That is
the true local derivative there (x_q = high * s on both sides of v = high), and what
torch 2.14's clamp does at its bounds; the official code's FunLSQ counts the bounds as inside
and its torch.minimum/maximum form splits the gradient at a tie, so the official behaviour at
the bounds depends on the path and the torch version. The bound is hit exactly in practice:
the absmax element right after an absmax initialisation.

Gradient scales g: weights 1/sqrt(Qp * sum|w|), activations 1/sqrt(N * Qp) with N the number
of elements of the quantized tensor in this call (all of them: every element contributes to
the one step size's gradient sum; the official code also takes x.numel()). LSQ proper uses
N_w = numel for weights; the official code's forward uses sum|w| (numel only in its
`get_quant_weight`) and, for activations, 1/(sqrt(N) * Qp). gradq uses the two forms above.

The step size is floored at LSQ_MIN_STEP in the forward, straight through in the backward
(s keeps its gradient, so an optimizer step that drove it under the floor can undo itself).
The official code clamps the parameter's data in place to 1e-4 instead, which an 8-bit step
of a small layer can legitimately approach; the floor here only guards against a zero or
negative step.

Non-finite values pass through fake quantization as they are, as they would without the
quantizer; a non-finite gradient reaches x's gradient wherever float's would.
"""

from __future__ import annotations

import math

import torch

from gradq_fx.config import Rounding
from gradq_fx.quantizer.core import least_squares_scale, round_values, scale_of, slice_rows

LSQ_MIN_STEP = 1e-8

# The MSE fit of a weight's step size stops at a fixed point (codes unchanged, so the scale is
# too) or after this many iterations. Each iteration can only lower ||w - s q||^2 (nearest codes
# for s, then the least-squares s for those codes), so it converges; measured on 37 x 61
# Gaussian tensors with outliers, 1 to 47 iterations (most at 3 and 4 bits).
# Starting points of the weight step-size fit: absmax / Qp times 2^0, 2^-1, ..., 2^-3.
LSQ_INIT_STARTS = 4
LSQ_INIT_MAX_ITERATIONS = 100


def lsq_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """The integer range (low, high) of an LSQ quantizer; LSQ's Qn = -low, Qp = high."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _lsq_ratio(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """v = (x - offset) / s in float32, s floored (straight through) at LSQ_MIN_STEP."""
    floored = scale + (scale.clamp_min(LSQ_MIN_STEP) - scale).detach()
    shifted = x.float() if offset is None else x.float() - offset
    return shifted / floored


def _lsq_round(ratio: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """The integer codes of v: clamp(round(v), low, high), round half to even."""
    return round_values(ratio, Rounding.NEAREST).clamp(low, high)


def lsq_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bits: int,
    signed: bool,
) -> torch.Tensor:
    """The integer codes clamp(round((x - offset) / s), low, high), as float32 (no gradient).

    scale (and offset) broadcast against x: a 0-dim tensor for a per-tensor quantizer, [C, 1]
    for one step per output channel of a [C, K] weight.
    """
    low, high = lsq_bounds(bits, signed)
    with torch.no_grad():
        return _lsq_round(_lsq_ratio(x, scale, offset), low, high)


def lsq_clipped(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bits: int,
    signed: bool,
) -> torch.Tensor:
    """x clipped to the quantizer's range, clamp(v, low, high) * s + offset, differentiable.

    Equals x inside the range (gradient to x) and the end level outside (gradient to s and the
    offset): the float weights the bin regularizer pulls towards their levels.
    """
    low, high = lsq_bounds(bits, signed)
    ratio = _lsq_ratio(x, scale, offset)
    # Not ratio.clamp(low, high): its gradient at the bounds has changed between torch
    # versions. Here the bounds count as clipped, as in LSQFakeQuantize.
    clipped = torch.where(ratio <= low, low, torch.where(ratio >= high, high, ratio)) * scale
    return clipped if offset is None else clipped + offset


def lsq_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    low: int,
    high: int,
) -> torch.Tensor:
    """x_q = clamp(round((x - offset) / s), low, high) * s + offset, in x's dtype (no gradient
    rule of its own: `LSQFakeQuantize` and the `gradq::lsq_fake_quantize` op add LSQ's)."""
    codes = _lsq_round(_lsq_ratio(x, scale, offset), low, high)
    restored = codes * scale.clamp_min(LSQ_MIN_STEP)
    restored = restored if offset is None else restored + offset
    # Clamping would turn an Inf into the top level: non-finite values pass as they are, as
    # they would without the quantizer (module docstring).
    return torch.where(torch.isfinite(x), restored, x.float()).to(x.dtype)


def lsq_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    low: int,
    high: int,
    step_grad_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """LSQ's straight-through gradients (module docstring): (dx, ds, doffset or None)."""
    ratio = _lsq_ratio(x, scale, offset)
    codes = _lsq_round(ratio, low, high)
    inside = (ratio > low) & (ratio < high)
    grad = grad_output.float()
    # A non-finite gradient passes the clipped elements too: an overflow must reach x's
    # gradient wherever float's would (fp16 loss scaling looks for it there).
    grad_x = torch.where(inside | ~torch.isfinite(grad), grad, 0.0).to(x.dtype)
    # round(v) - v inside; the clamped code (low or high) outside.
    step_slope = codes - torch.where(inside, ratio, 0.0)
    grad_scale = (grad * step_slope).sum_to_size(scale.shape) * step_grad_scale
    grad_offset = None
    if offset is not None:
        grad_offset = torch.where(inside, 0.0, grad).sum_to_size(offset.shape).to(offset.dtype)
    return grad_x, grad_scale.to(scale.dtype), grad_offset


class LSQFakeQuantize(torch.autograd.Function):
    """`lsq_forward` with `lsq_backward`'s gradients, for eager use.

    Arguments: x, scale (broadcastable against x), offset (same, or None), low, high (ints),
    grad_scale (a tensor of scale's shape, or 0-dim). Computed in float32, the result and x's
    gradient in x's dtype. Under torch.compile models use the `gradq::lsq_fake_quantize` op
    instead (gradq_fx/ops.py: the same two functions as one custom op the rewrite can see).
    """

    @staticmethod
    def forward(ctx, x, scale, offset, low, high, grad_scale):
        saved_offset = offset if offset is not None else scale.new_zeros(())
        ctx.save_for_backward(x, scale, saved_offset, grad_scale)
        ctx.has_offset, ctx.bounds = offset is not None, (low, high)
        return lsq_forward(x, scale, offset, low, high)

    @staticmethod
    def backward(ctx, grad_output):
        x, scale, offset, step_grad_scale = ctx.saved_tensors
        low, high = ctx.bounds
        offset = offset if ctx.has_offset else None
        grads = lsq_backward(grad_output, x, scale, offset, low, high, step_grad_scale)
        return *grads, None, None, None


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None = None,
    *,
    bits: int,
    signed: bool = True,
    grad_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """LSQ fake quantization of x (`LSQFakeQuantize`); an offset needs an unsigned quantizer.

    grad_scale: a float, or a tensor with one value per step size (any shape of scale.numel()
    elements, e.g. `lsq_weight_grad_scale`'s [C] for a [C, 1] scale).
    """
    low, high, grad_scale = lsq_arguments(scale, offset, bits, signed, grad_scale)
    return LSQFakeQuantize.apply(x, scale, offset, low, high, grad_scale)


def lsq_arguments(
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bits: int,
    signed: bool,
    grad_scale: torch.Tensor | float,
) -> tuple[int, int, torch.Tensor]:
    """Checked (low, high, grad_scale tensor) of an LSQ fake quantization's arguments."""
    low, high = lsq_bounds(bits, signed)
    if offset is not None and signed:
        raise ValueError("lsq_fake_quantize: an offset goes with an unsigned quantizer")
    grad_scale = torch.as_tensor(grad_scale, dtype=torch.float32, device=scale.device)
    if grad_scale.numel() not in (1, scale.numel()):
        raise ValueError(
            f"grad_scale has {grad_scale.numel()} values for {scale.numel()} step sizes"
        )
    return low, high, grad_scale.reshape(scale.shape if grad_scale.numel() > 1 else ())


def _lsq_per_row(stat: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """A per-row statistic [R] as the step size's shape: [C], or 0-dim for one row."""
    return stat if per_channel else stat.reshape(())


def lsq_weight_grad_scale(
    weight: torch.Tensor, bits: int, per_channel: bool = False
) -> torch.Tensor:
    """g = 1 / sqrt(Qp * sum|w|), per tensor or per output channel (row of dim 0).

    Per channel, the sum runs over the channel's own weights: its step size's gradient sums
    over them only. A slice of zeros gets g = 1 (its step gradient is zero anyway).
    Returns float32, 0-dim or [C], without gradient.
    """
    _, high = lsq_bounds(bits, signed=True)
    with torch.no_grad():
        total = slice_rows(weight.float(), 0, per_channel).abs().sum(dim=1)
        scale = torch.where(total > 0, torch.rsqrt(high * total), torch.ones_like(total))
    return _lsq_per_row(scale, per_channel)


def lsq_activation_grad_scale(x: torch.Tensor, bits: int, signed: bool) -> float:
    """g = 1 / sqrt(N * Qp), N = x.numel() (shapes only, so no host sync)."""
    _, high = lsq_bounds(bits, signed)
    return 1.0 / math.sqrt(max(x.numel(), 1) * high)


def lsq_init_weight_scale(
    weight: torch.Tensor,
    bits: int,
    per_channel: bool = False,
    max_iterations: int = LSQ_INIT_MAX_ITERATIONS,
) -> torch.Tensor:
    """The MSE-fit step size of a signed weight quantizer: s <- <w, q(w; s)> / <q, q>.

    Starts from absmax / Qp and iterates to a fixed point (the codes stop changing), at most
    `max_iterations` times. Per channel, each row of dim 0 is fitted on its own (iterations
    continue until every row is stable). Runs once per quantizer, eagerly: it reads one
    boolean per iteration on the host, unlike the rest of this module. An all-zero slice gets 1.
    Returns float32, 0-dim or [C].

    The fit is local: from absmax / Qp alone it stops at the first fixed point downhill, which
    was 1.2x to 1.3x the mse of the best step on a fine grid at 8 bits, and 3x at 2 bits on a
    Gaussian with five 8- to 12-sigma outliers (stuck next to absmax). So the fit also starts
    from absmax / Qp shrunk by 2^-1 ... 2^-(LSQ_INIT_STARTS - 1), and each row keeps the fixed
    point of lowest mse: still an MSE fit, from several starting points.
    """
    _, high = lsq_bounds(bits, signed=True)
    with torch.no_grad():
        rows = slice_rows(weight.float(), 0, per_channel)
        absmax_scale = scale_of(rows.abs().amax(dim=1), high)
        best_scale, best_error = absmax_scale, None
        for start in range(LSQ_INIT_STARTS):
            scale = _lsq_fixed_point(rows, absmax_scale * 2.0**-start, bits, max_iterations)
            restored = lsq_codes(rows, scale[:, None], None, bits, signed=True) * scale[:, None]
            error = (rows - restored).square().sum(dim=1)
            if best_error is None:
                best_scale, best_error = scale, error
            else:
                better = error < best_error
                best_scale = torch.where(better, scale, best_scale)
                best_error = torch.where(better, error, best_error)
    return _lsq_per_row(best_scale, per_channel)


def _lsq_fixed_point(rows, scale, bits: int, max_iterations: int) -> torch.Tensor:
    """Iterate s <- <w, q(w; s)> / <q, q> from `scale` until the codes stop changing."""
    codes = None
    for _ in range(max_iterations):
        new_codes = lsq_codes(rows, scale[:, None], None, bits, signed=True)
        if codes is not None and torch.equal(new_codes, codes):
            break
        codes = new_codes
        scale = least_squares_scale(rows, codes)
    return scale


def lsq_init_activation_scale(x: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """2 * mean|x| / sqrt(Qp) from one batch (LSQ's rule), Qp = this range's high.

    For an unsigned quantizer that is 2^b - 1 (LSQ's definition); the official code uses the
    signed 2^(b-1) - 1 here for every activation. An all-zero x gets 1. Float32, 0-dim.
    """
    _, high = lsq_bounds(bits, signed)
    with torch.no_grad():
        mean = x.float().abs().mean()
        return torch.where(mean > 0, 2.0 * mean / math.sqrt(high), torch.ones_like(mean))
