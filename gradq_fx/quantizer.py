"""The one home of gradq's quantizer math, in pure torch.

Passes lower quantized GEMMs to `quantized_matmul`; kernels must reproduce it bit for bit.
Every function here traces under torch.compile (no data-dependent shapes, no host sync).

Semantics of a quantized GEMM out = a @ b, a [..., M, K], b [..., K, N]:
  scale_a = clip_a / qmax      one per row of a (per_row) or one per tensor, reduced over K
  scale_b = clip_b / qmax      one per column of b (per_row) or one per tensor, reduced over K
  q_a     = clamp(round(a / scale_a), -qmax, qmax)  as int8     (likewise q_b)
  scale_a = <a, q_a> / <q_a, q_a>  per slice, only with `scaling` (likewise scale_b)
  acc     = q_a @ q_b          exact, in int32
  out     = (float32(acc) * scale_a * scale_b + bias)  cast to a's dtype
A slice that is all zeros gets scale 1 (and quantizes to zeros).

Non-finite values behave as in float. A slice holding a NaN or an Inf has a clipping value
that is not finite (absmax, and the iqr fence capped at it, propagate both), and such a clip
makes the slice's scale NaN (`scale_of`) and its codes 0 (`codes`): every output the slice
feeds is NaN, which covers every output float makes non-finite from it (a row of the output
per row of a, a column per column of b, the whole output per tensor). fp16 loss scaling
(`torch.amp.GradScaler`) finds overflow by exactly this; a finite stand-in would hide it.
"""

from __future__ import annotations

import math

import torch

from gradq_fx.config import Clipping, Granularity, QuantSpec, Rounding
from gradq_fx.kernels.int_mm import (
    int8_conv2d,
    int8_conv2d_input_grad,
    int8_conv2d_weight_grad,
    int8_gemm,
)

# Fences tried by the `iqr` clipping: Q3 + k * IQR for k = 1, 2, 4, ..., 64 (k = 2^i, i below
# this count). The candidate with the best cosine similarity wins; the absmax (minmax) clip
# is always a candidate too, so `iqr` is never worse in cosine than `minmax` (up to the tie
# tolerance) under nearest rounding.
IQR_FENCE_COUNT = 7

# Quartiles come from a log2 histogram of |x| / absmax: 16 bins per octave over 40 octaves.
# A bin spans a factor 2^(1/16), so a quartile is off by at most 2.2% (bin's geometric middle);
# values below absmax * 2^-40 share the last bin, far under any useful clip.
IQR_BINS_PER_OCTAVE = 16
IQR_OCTAVES = 40
IQR_NUM_BINS = IQR_BINS_PER_OCTAVE * IQR_OCTAVES
# Cosines closer than this to the best count as tied (float32 noise on a sum of C terms).
IQR_COSINE_TIE = 1e-6


def as_rows(x: torch.Tensor, dim: int, per_row: bool) -> torch.Tensor:
    """View x as [rows, reduced] with `dim` reduced: per row, or the whole tensor as one row."""
    if not per_row:
        return x.reshape(1, -1)
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def _from_rows(stat: torch.Tensor, x: torch.Tensor, dim: int, per_row: bool) -> torch.Tensor:
    """Inverse of `as_rows` for a per-row statistic: a tensor broadcastable against x."""
    if not per_row:
        return stat.reshape([1] * x.dim())
    shape = list(x.movedim(dim, -1).shape)
    shape[-1] = 1
    return stat.reshape(shape).movedim(-1, dim)


def estimate_quartiles(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q1 and Q3 of |rows| along the last dimension, from one log-histogram pass (no sort).

    rows: [R, C] float32. Returns two [R] tensors. Exact quartiles would need a sort of every
    row (torch.quantile refuses tensors over 16M elements); the histogram costs one scatter.
    """
    mag = rows.abs()
    amax = mag.amax(dim=1, keepdim=True)
    safe_amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    # Bin i holds |x| / amax in (2^-(i+1)/16, 2^-i/16]; zeros fall into the last bin.
    octaves_below = -torch.log2(mag / safe_amax) * IQR_BINS_PER_OCTAVE
    bins = torch.nan_to_num(octaves_below, posinf=IQR_NUM_BINS - 1).floor()
    bins = bins.clamp(0, IQR_NUM_BINS - 1).long()
    counts = torch.zeros(rows.shape[0], IQR_NUM_BINS, device=rows.device, dtype=torch.float32)
    counts.scatter_add_(1, bins, torch.ones_like(mag))
    # Ascending magnitude = descending bin index: accumulate from the last bin.
    from_smallest = counts.flip(1).cumsum(1)
    n = rows.shape[1]  # stays symbolic under dynamic shapes (float() would specialise it)

    def quantile(p: float) -> torch.Tensor:
        reached = (from_smallest >= p * n).float().argmax(dim=1)  # first bin reaching p
        bin_index = (IQR_NUM_BINS - 1) - reached
        middle = torch.exp2(-(bin_index.float() + 0.5) / IQR_BINS_PER_OCTAVE)
        # The last bin holds the zeros (and values under amax * 2^-40): call it 0, so a row
        # that is mostly zeros has Q1 = Q3 = 0 rather than a spurious tiny spread.
        return torch.where(reached == 0, 0.0, middle * amax.squeeze(1))

    return quantile(0.25), quantile(0.75)


def _round(x: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    if rounding is Rounding.NEAREST:
        return torch.round(x)  # half to even
    # Stochastic: floor(x + u), u ~ U[0, 1), so E[result] = x exactly.
    return torch.floor(x + torch.rand_like(x))


def codes(v: torch.Tensor, rounding: Rounding, qmax: int) -> torch.Tensor:
    """The integer codes clamp(round(v), -qmax, qmax) of v = x / scale, as float32; 0 where v
    is NaN (a slice whose scale is NaN: what it feeds is NaN whatever its codes)."""
    return torch.nan_to_num(_round(v, rounding).clamp(-qmax, qmax), nan=0.0)


def keep_nonfinite(scale: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """scale where the slice's clip is finite, NaN where it is not (module docstring)."""
    return torch.where(torch.isfinite(clip), scale, torch.nan)


def scale_of(clip: torch.Tensor, qmax: int) -> torch.Tensor:
    """The scale of slices clipped at `clip`: clip / qmax; 1 for an all-zero slice (clip 0);
    NaN where the clip is not finite."""
    return keep_nonfinite(torch.where(clip > 0, clip / qmax, 1.0), clip)


def clip_value(rows: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The clipping magnitude of each row of `rows` ([R, C] float32) -> [R]."""
    amax = rows.abs().amax(dim=1)
    if spec.clipping is Clipping.MINMAX:
        return amax
    q1, q3 = estimate_quartiles(rows)
    # Largest clip first: amax, then Q3 + k * IQR for k = 64, 32, ..., 1 (k = 2^i). Built with
    # arange, not torch.tensor: graph rewrites cannot splice tensor constants.
    exponents = torch.arange(IQR_FENCE_COUNT - 1, -1, -1, device=rows.device, dtype=rows.dtype)
    fences = q3[:, None] + torch.exp2(exponents) * (q3 - q1)[:, None]
    # A zero fence (Q3 = 0: over three quarters of the row is zero) says nothing about the
    # spread of the nonzero values: use amax.
    fences = torch.where(fences > 0, torch.minimum(fences, amax[:, None]), amax[:, None])
    candidates = torch.cat([amax[:, None], fences], dim=1)  # [R, F]
    # Score every candidate at once ([R, F, C], one fused reduction under Inductor) by the
    # cosine of nearest rounding, so the choice is deterministic even when the final rounding
    # is stochastic.
    scale = scale_of(candidates, spec.qmax)[:, :, None]
    restored = torch.round(rows[:, None, :] / scale).clamp(-spec.qmax, spec.qmax) * scale
    dot = (rows[:, None, :] * restored).sum(dim=2)
    cosine = dot / (rows.norm(dim=1, keepdim=True) * restored.norm(dim=2)).clamp_min(1e-30)
    # Cosine cannot see magnitude: a row with one nonzero value has cosine 1 at any clip,
    # however saturated. Among candidates within float noise of the best, take the largest.
    near_best = cosine >= cosine.amax(dim=1, keepdim=True) - IQR_COSINE_TIE
    first = near_best.float().argmax(dim=1, keepdim=True)
    return candidates.gather(1, first).squeeze(1)


def quantize(
    x: torch.Tensor, spec: QuantSpec, dim: int, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x with one scale per slice along `dim` (the contracted dimension).

    Returns (q, scale): q int8 with x's shape, scale float32 broadcastable against x (size 1
    along `dim`, and along every dimension for per_tensor). IQS has no integer form: see
    `simulate`. clip: each slice's clipping magnitude, as `clip_value` gives it ([R] float32;
    one value for per_tensor) where another kernel computed it; None computes it here.
    """
    if spec.clipping is Clipping.IQS:
        raise ValueError("quantize: the IQS codebook has no integer form; use simulate()")
    per_row = spec.granularity is Granularity.PER_ROW
    x32 = x.float()
    rows = as_rows(x32, dim, per_row)
    clip = clip_value(rows, spec) if clip is None else clip.reshape(-1)
    scale = _from_rows(scale_of(clip, spec.qmax), x32, dim, per_row)
    q = codes(x32 / scale, spec.rounding, spec.qmax)
    if spec.scaling:
        fitted = keep_nonfinite(least_squares_scale(rows, as_rows(q, dim, per_row)), clip)
        scale = _from_rows(fitted, x32, dim, per_row)
    return q.to(torch.int8), scale


def least_squares_scale(rows: torch.Tensor, q_rows: torch.Tensor) -> torch.Tensor:
    """argmin_s ||x - s q||^2 = <x, q> / <q, q> per row ([R, C] -> [R]); 1 where q is all zero."""
    numerator = (rows * q_rows).sum(dim=1)
    denominator = (q_rows * q_rows).sum(dim=1)
    return torch.where(denominator > 0, numerator / denominator, torch.ones_like(denominator))


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def quantization_stats(
    x: torch.Tensor, spec: QuantSpec, dim: int, clip: torch.Tensor | None = None
) -> torch.Tensor:
    """[cos(x, x_q), ||x - x_q||^2 / ||x||^2, 1] for x_q = dequantize(quantize(x, spec, dim)).

    The trailing 1 counts: summed over steps (as gradients accumulate) the vector holds the
    totals and the number of steps. An all-zero x counts as cosine 1, error 0; an x holding a
    NaN or an Inf gives NaN. clip: as in `quantize`.
    """
    x32 = x.float()
    restored = simulate(x, spec, dim, clip)
    norms = x32.norm() * restored.norm()
    energy = x32.square().sum()
    # Only an all-zero x is exact by convention: a NaN or Inf in x gives NaN statistics.
    cosine = torch.where(norms == 0, 1.0, (x32 * restored).sum() / norms)
    error = torch.where(energy == 0, 0.0, (x32 - restored).square().sum() / energy)
    return torch.stack([cosine, error, torch.ones_like(cosine)])


# IQS: 16 logarithmic levels inside [Q1, Q3] (8 per sign, halving from the quartile down),
# and 240 uniform levels over the two outlier regions, split in proportion to how many values
# lie beyond each quartile. Our reading of a secondary summary (method.md item 1).
_IQS_CENTRAL_PER_SIGN = 8
_IQS_OUTER = 240


def iqs_codebook(rows: torch.Tensor) -> torch.Tensor:
    """The IQS levels of each row of `rows` ([R, C] float32) -> [R, 256], ascending.

    Quartiles are exact (kthvalue), which is fine for a simulated accuracy-study path.
    """
    count = rows.shape[1]
    q1 = rows.kthvalue(max(1, (count + 3) // 4), dim=1).values[:, None]
    q3 = rows.kthvalue(max(1, (3 * count + 3) // 4), dim=1).values[:, None]
    low, high = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    halvings = torch.exp2(-torch.arange(_IQS_CENTRAL_PER_SIGN, device=rows.device).float())
    central = torch.cat([q3.clamp_min(0) * halvings, q1.clamp_max(0) * halvings], dim=1)
    above = (rows > q3).sum(dim=1, keepdim=True).float()
    below = (rows < q1).sum(dim=1, keepdim=True).float()
    n_above = torch.round(_IQS_OUTER * above / (above + below).clamp_min(1.0))
    n_below = _IQS_OUTER - n_above
    slot = torch.arange(1, _IQS_OUTER + 1, device=rows.device).float()[None, :]
    upper = q3 + (high - q3) * slot / n_above.clamp_min(1.0)
    lower = q1 - (q1 - low) * (slot - n_above) / n_below.clamp_min(1.0)
    outer = torch.where(slot <= n_above, upper, lower)
    return torch.cat([central, outer], dim=1).sort(dim=1).values


def iqs_simulate(x: torch.Tensor, dim: int, per_row: bool) -> torch.Tensor:
    """x rounded to the nearest level of its IQS codebook (float32, x's shape)."""
    x32 = x.float()
    rows = as_rows(x32, dim, per_row)
    levels = iqs_codebook(rows)
    midpoints = (levels[:, 1:] + levels[:, :-1]) / 2
    index = torch.searchsorted(midpoints, rows.contiguous())
    # A row holding a NaN or an Inf has non-finite extreme levels (its min and max): the row
    # comes out NaN, as a uniform grid's would (module docstring).
    finite = torch.isfinite(levels[:, :1]) & torch.isfinite(levels[:, -1:])
    nearest = torch.where(finite, levels.gather(1, index), torch.nan)
    if not per_row:
        return nearest.reshape(x32.shape)
    return nearest.reshape(x32.movedim(dim, -1).shape).movedim(-1, dim)


def simulate(
    x: torch.Tensor, spec: QuantSpec, dim: int, clip: torch.Tensor | None = None
) -> torch.Tensor:
    """What the GEMM sees of x after quantization, in float32 (any clipping, IQS included).

    clip: as in `quantize` (not for IQS, which has no single clip)."""
    if spec.clipping is Clipping.IQS:
        if clip is not None:
            raise ValueError("simulate: the IQS codebook takes no clip")
        return iqs_simulate(x, dim, spec.granularity is Granularity.PER_ROW)
    return dequantize(*quantize(x, spec, dim, clip))


def _fake_quantized(x: torch.Tensor, spec: QuantSpec | None, dim: int) -> torch.Tensor:
    """x as a fake-quantized GEMM operand (float32): as is when spec is None (quantized
    upstream, by an LSQ quantizer), else `simulate`d with spec."""
    return x.float() if spec is None else simulate(x, spec, dim)


def is_fake_quantized(a_spec: QuantSpec | None, b_spec: QuantSpec | None) -> bool:
    """Whether `quantized_matmul` runs this GEMM as fake quantization rather than INT8: an
    operand quantized upstream (None), below 8 bits, or with the IQS codebook."""
    specs = (a_spec, b_spec)
    if None in specs:
        return True
    return any(s.bits < 8 or s.clipping is Clipping.IQS for s in specs)


def quantized_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    a_spec: QuantSpec | None,
    b_spec: QuantSpec | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """a @ b with both operands quantized (module docstring); output in a's dtype.

    At 8 bits: the INT8 GEMM. Otherwise (`is_fake_quantized`) fake quantization: each operand
    quantized and dequantized (or decoded, for IQS; or taken as is where its spec is None,
    i.e. an LSQ quantizer already did it), then a float32 GEMM. Below 8 bits an INT8 GEMM of
    the codes would be exact too; fake quantization is what low-bit QAT trains with
    (Quantization Variation's code), it keeps one code path for LSQ and min-max operands, and
    no sub-8-bit GEMM kernel exists here to make it faster.
    """
    if is_fake_quantized(a_spec, b_spec):
        a_q, b_q = _fake_quantized(a, a_spec, dim=-1), _fake_quantized(b, b_spec, dim=-2)
        out = torch.matmul(a_q, b_q)
    else:
        a_q, a_scale = quantize(a, a_spec, dim=-1)
        b_q, b_scale = quantize(b, b_spec, dim=-2)
        out = int8_gemm(a_q, b_q).float() * a_scale * b_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(a.dtype)


# --------------------------------------------------------------------------- convolutions
#
# A dense convolution (groups 1, dilation 1, any kernel, stride and padding) as three implicit
# GEMMs. out[n, o, p] = sum over (c, kh, kw) of W[o, c, kh, kw] * X[n, c, p + offset(kh, kw)]:
# a scale factors out of the integer sum only if it is constant over what is summed, and the
# input's window moves with p, so a scale of X may not vary across pixels. What each operand
# gets where the config asks for `per_row` (with `per_tensor`, every operand is per tensor):
#   forward  out = conv(X, W)      sums (c, kh, kw):  X per image n,  W per output channel o
#   dgrad    dX  = conv^T(dY, W)   sums (o, kh, kw):  dY per image n, W per input channel c
#   wgrad    dW  = corr(X, dY)     sums (n, h, w):    X per input channel c, dY per output
#                                                      channel o (shifts keep the channel)
# Per image is the finest valid grouping of X in forward and of dY in dgrad (one scale per
# pixel, the GEMM's "row", would vary along the window): `conv2d_scale_groups` names these
# groupings and the report shows them. The integer sums are exact (`kernels.int_mm`), then
# dequantized by (left operand's scale) x (right operand's scale) in that order, as in
# `quantized_matmul`.


def quantize_slices(
    x: torch.Tensor, spec: QuantSpec, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x with one scale per index of dimension `keep` (per_row; the slice is every
    other dimension) or one for the tensor (per_tensor).

    Returns q (int8, x's shape) and the scales, float32 [x.shape[keep]] (a per-tensor scale
    repeated). This is `quantize` of x viewed as rows [x.shape[keep], rest].
    """
    rows = x.movedim(keep, 0).reshape(x.shape[keep], -1)
    q, scale = quantize(rows, spec, dim=-1)
    shape = (x.shape[keep], *x.movedim(keep, 0).shape[1:])
    return q.reshape(shape).movedim(0, keep), scale.expand(x.shape[keep], 1).reshape(-1)


def simulate_slices(x: torch.Tensor, spec: QuantSpec, keep: int) -> torch.Tensor:
    """What an implicit GEMM sees of x (float32), quantized as `quantize_slices` groups it."""
    rows = x.movedim(keep, 0).reshape(x.shape[keep], -1)
    restored = simulate(rows, spec, dim=-1)
    return restored.reshape(x.movedim(keep, 0).shape).movedim(0, keep)


def conv2d_scale_groups(role: str, granularity: Granularity) -> tuple[str, str]:
    """What one scale of each operand of a convolution's `role` GEMM covers (section comment):
    ('image', 'output channel') for the forward under per_row, ('tensor', 'tensor') per_tensor."""
    if granularity is Granularity.PER_TENSOR:
        return "tensor", "tensor"
    groups = {
        "forward": ("image", "output channel"),
        "dgrad": ("image", "input channel"),
        "wgrad": ("input channel", "output channel"),
    }
    if role not in groups:
        raise ValueError(f"conv2d_scale_groups: role must be one of {sorted(groups)}, got {role!r}")
    return groups[role]


def _outer_scales(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """float32(acc) [A, B, ...] times left [A] along dim 0, then right [B] along dim 1."""
    return acc.float() * left[:, None, None, None] * right[None, :, None, None]


def quantized_conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stride,
    padding,
    x_spec: QuantSpec,
    w_spec: QuantSpec,
) -> torch.Tensor:
    """F.conv2d(x, w, bias, stride, padding) with x [N, C, H, W] quantized per image and w
    [O, C, kh, kw] per output channel (or per tensor); output in x's dtype. IQS or below 8
    bits: simulated (`is_fake_quantized`), as `quantized_matmul` does."""
    if is_fake_quantized(x_spec, w_spec):
        x_sim, w_sim = simulate_slices(x, x_spec, 0), simulate_slices(w, w_spec, 0)
        out = torch.nn.functional.conv2d(x_sim, w_sim, None, stride, padding)
    else:
        x_q, x_scale = quantize_slices(x, x_spec, keep=0)
        w_q, w_scale = quantize_slices(w, w_spec, keep=0)
        out = _outer_scales(int8_conv2d(x_q, w_q, stride, padding), x_scale, w_scale)
    if bias is not None:
        out = out + bias.float()[:, None, None]
    return out.to(x.dtype)


def quantized_conv2d_input_grad(
    dy: torch.Tensor,
    w: torch.Tensor,
    input_size,
    stride,
    padding,
    dy_spec: QuantSpec,
    w_spec: QuantSpec,
) -> torch.Tensor:
    """The input gradient [N, C, *input_size] of conv2d from dY [N, O, H', W'] (per image) and
    w (per input channel), or per tensor; in dY's dtype. Simulated as in `quantized_conv2d`."""
    if is_fake_quantized(dy_spec, w_spec):
        dy_sim, w_sim = simulate_slices(dy, dy_spec, 0), simulate_slices(w, w_spec, 1)
        shape = (dy.shape[0], w.shape[1], *input_size)
        out = torch.nn.grad.conv2d_input(shape, w_sim, dy_sim, stride, padding)
    else:
        dy_q, dy_scale = quantize_slices(dy, dy_spec, keep=0)
        w_q, w_scale = quantize_slices(w, w_spec, keep=1)
        acc = int8_conv2d_input_grad(dy_q, w_q, stride, padding, input_size)
        out = _outer_scales(acc, dy_scale, w_scale)
    return out.to(dy.dtype)


def quantized_conv2d_weight_grad(
    x: torch.Tensor,
    dy: torch.Tensor,
    kernel_size,
    stride,
    padding,
    x_spec: QuantSpec,
    dy_spec: QuantSpec,
) -> torch.Tensor:
    """The weight gradient [O, C, *kernel_size] of conv2d from x (per input channel) and dY
    (per output channel), or per tensor; in x's dtype. Simulated as in `quantized_conv2d`."""
    if is_fake_quantized(x_spec, dy_spec):
        x_sim, dy_sim = simulate_slices(x, x_spec, 1), simulate_slices(dy, dy_spec, 1)
        shape = (dy.shape[1], x.shape[1], *kernel_size)
        out = torch.nn.grad.conv2d_weight(x_sim, shape, dy_sim, stride, padding)
    else:
        x_q, x_scale = quantize_slices(x, x_spec, keep=1)
        dy_q, dy_scale = quantize_slices(dy, dy_spec, keep=1)
        acc = int8_conv2d_weight_grad(x_q, dy_q, stride, padding, kernel_size)
        out = _outer_scales(acc, dy_scale, x_scale)
    return out.to(x.dtype)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (float64), the measure tests put floors on."""
    ref = reference.double()
    noise = (ref - approximation.double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal.item() / noise.item())


# --------------------------------------------------------------------------- LSQ (low-bit QAT)
#
# Learned step size quantization as the Quantization Variation paper's official code uses it
# (method.md, "Quantization Variation components"), for 2- to 8-bit fake quantization:
#
#   v    = (x - offset) / s                      offset only for unsigned quantizers
#   code = clamp(round(v), low, high)            round half to even, as everywhere here
#   x_q  = code * s + offset
#
# Integer range. Signed: low = -2^(b-1), high = 2^(b-1) - 1 (two's complement), as LSQ and the
# official code use; unlike the INT8 GEMM path's symmetric [-qmax, qmax]. At 2 bits the
# symmetric range keeps 3 of 4 levels ({-1, 0, 1}), a quarter of the grid lost where every level
# counts; negation exactness (why the INT8 path drops -128) does not matter for a fake-quantized
# float GEMM, and the codes still fit in int8 at 8 bits. Unsigned (post-GELU activations):
# low = 0, high = 2^b - 1, with a learnable offset that the code subtracts before and adds back
# after quantizing (the official code's form), so GELU's negative tail (down to -0.17) has a
# level. LSQ's Qp is `high`; its Qn is -low.
#
# Gradients (straight-through, LSQ's equation 3):
#   dx_q/dx      = 1 if low < v < high else 0
#   dx_q/ds      = round(v) - v if low < v < high, low if v <= low, high if v >= high; times
#                  the gradient scale g
#   dx_q/doffset = 0 inside, 1 outside (not scaled by g: the official code leaves it unscaled)
# The inside is open, as in the LSQ paper: v exactly at low or high counts as clipped. That is
# the true local derivative there (x_q = high * s on both sides of v = high), and what
# torch 2.14's clamp does at its bounds; the official code's FunLSQ counts the bounds as inside and
# its torch.minimum/maximum form splits the gradient at a tie, so the official behaviour at
# the bounds depends on the path and the torch version. The bound is hit exactly in practice:
# the absmax element right after an absmax initialisation.
#
# Gradient scales g (method.md): weights 1/sqrt(Qp * sum|w|), activations 1/sqrt(N * Qp) with N
# the number of elements of the quantized tensor in this call (all of them: every element
# contributes to the one step size's gradient sum; the official code also takes x.numel()).
# Note: LSQ proper uses N_w = numel for weights; the official code's forward uses sum|w|
# (numel only in its `get_quant_weight`) and, for activations, 1/(sqrt(N) * Qp). gradq follows
# method.md in both places.
#
# The step size is floored at LSQ_MIN_STEP in the forward, straight through in the backward
# (s keeps its gradient, so an optimizer step that drove it under the floor can undo itself).
# The official code clamps the parameter's data in place to 1e-4 instead, which an 8-bit step
# of a small layer can legitimately approach; the floor here only guards against a zero or
# negative step.
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
    return _round(ratio, Rounding.NEAREST).clamp(low, high)


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
    """LSQ's straight-through gradients (section comment): (dx, ds, doffset or None)."""
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
    gradient in x's dtype. Under torch.compile models use `gradq_fx.ops.lsq_fake_quantize`
    instead (the same two functions as one custom op the rewrite can see).
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


def _lsq_rows(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """x as [C, rest] (one row per slice along dim 0) or as one row."""
    return x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)


def _lsq_per_row(stat: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """A per-row statistic [R] as the step size's shape: [C], or 0-dim for one row."""
    return stat if per_channel else stat.reshape(())


def lsq_weight_grad_scale(
    weight: torch.Tensor, bits: int, per_channel: bool = False
) -> torch.Tensor:
    """g = 1 / sqrt(Qp * sum|w|) (method.md), per tensor or per output channel (row of dim 0).

    Per channel, the sum runs over the channel's own weights: its step size's gradient sums
    over them only. A slice of zeros gets g = 1 (its step gradient is zero anyway).
    Returns float32, 0-dim or [C], without gradient.
    """
    _, high = lsq_bounds(bits, signed=True)
    with torch.no_grad():
        total = _lsq_rows(weight.float(), per_channel).abs().sum(dim=1)
        scale = torch.where(total > 0, torch.rsqrt(high * total), torch.ones_like(total))
    return _lsq_per_row(scale, per_channel)


def lsq_activation_grad_scale(x: torch.Tensor, bits: int, signed: bool) -> float:
    """g = 1 / sqrt(N * Qp), N = x.numel() (method.md; shapes only, so no host sync)."""
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
        rows = _lsq_rows(weight.float(), per_channel)
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
    """2 * mean|x| / sqrt(Qp) from one batch (LSQ's rule, method.md), Qp = this range's high.

    For an unsigned quantizer that is 2^b - 1 (LSQ's definition); the official code uses the
    signed 2^(b-1) - 1 here for every activation. An all-zero x gets 1. Float32, 0-dim.
    """
    _, high = lsq_bounds(bits, signed)
    with torch.no_grad():
        mean = x.float().abs().mean()
        return torch.where(mean > 0, 2.0 * mean / math.sqrt(high), torch.ones_like(mean))
