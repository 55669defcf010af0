"""The quantizer of one operand: rows, clipping, rounding, scales, quantize, statistics, IQS.

Quantizing x along `dim` (the contracted dimension of the GEMM it feeds), one scale per
slice (`per_row`: every index of the other dimensions; `per_tensor`: the whole tensor):

  clip  = the slice's clipping magnitude (`clip_value`: its absmax, or the `iqr` fence)
  scale = clip / qmax          1 for an all-zero slice (`scale_of`)
  q     = clamp(round(x / scale), -qmax, qmax)   as int8 (`codes`; qmax = 2^(bits - 1) - 1)
  scale = <x, q> / <q, q>      per slice, only with `scaling` (`least_squares_scale`)

IQS (a non-uniform codebook) has no integer form: `simulate` rounds x to its levels in float.
docs/method.md (Quantizers) gives the reasons for each choice.

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

# --------------------------------------------------------------------------- rows views
#
# Every quantizer works on rows [R, C] with one scale per row. Two ways to get them:
# `as_rows` reduces one dimension (a GEMM operand's contracted dimension: a row per slice
# along it); `slice_rows` keeps one (a convolution operand or an LSQ weight: a row per index
# of that dimension, the rest flattened). Each has its way back.


def as_rows(x: torch.Tensor, dim: int, per_row: bool) -> torch.Tensor:
    """View x as [rows, reduced] with `dim` reduced: per row, or the whole tensor as one row."""
    if not per_row:
        return x.reshape(1, -1)
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def from_rows(rows: torch.Tensor, x: torch.Tensor, dim: int, per_row: bool) -> torch.Tensor:
    """Inverse of `as_rows`: rows [R, C] of x's size back in x's shape."""
    if not per_row:
        return rows.reshape(x.shape)
    return rows.reshape(x.movedim(dim, -1).shape).movedim(-1, dim)


def row_values_like(stat: torch.Tensor, x: torch.Tensor, dim: int, per_row: bool) -> torch.Tensor:
    """A per-row statistic [R] of `as_rows(x, dim, per_row)` as a tensor broadcastable against
    x: size 1 along `dim` (along every dimension for one row)."""
    if not per_row:
        return stat.reshape([1] * x.dim())
    shape = list(x.movedim(dim, -1).shape)
    shape[-1] = 1
    return stat.reshape(shape).movedim(-1, dim)


def slice_rows(x: torch.Tensor, keep: int, per_slice: bool = True) -> torch.Tensor:
    """View x as [x.shape[keep], rest]: one row per index of dimension `keep`, every other
    dimension flattened into it; or the whole tensor as one row (not `per_slice`)."""
    if not per_slice:
        return x.reshape(1, -1)
    return x.movedim(keep, 0).reshape(x.shape[keep], -1)


def from_slice_rows(rows: torch.Tensor, x: torch.Tensor, keep: int) -> torch.Tensor:
    """Inverse of `slice_rows` (per slice): rows of x's size back in x's shape."""
    return rows.reshape(x.movedim(keep, 0).shape).movedim(0, keep)


# --------------------------------------------------------------------------- rounding, scales


def round_values(x: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    """x rounded to integers (float32): to nearest, ties to even (torch.round), or
    stochastically, floor(x + u) with u ~ U[0, 1), so that E[result] = x exactly."""
    if rounding is Rounding.NEAREST:
        return torch.round(x)
    return torch.floor(x + torch.rand_like(x))


def codes(v: torch.Tensor, rounding: Rounding, qmax: int) -> torch.Tensor:
    """The integer codes clamp(round(v), -qmax, qmax) of v = x / scale, as float32; 0 where v
    is NaN (a slice whose scale is NaN: what it feeds is NaN whatever its codes)."""
    clamped = round_values(v, rounding).clamp(-qmax, qmax)
    # NaN is the only non-finite value left after the clamp, and the one value unequal to
    # itself: one compare per value, where nan_to_num also tests for both infinities.
    return torch.where(clamped == clamped, clamped, 0.0)


def keep_nonfinite(scale: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """scale where the slice's clip is finite, NaN where it is not (module docstring)."""
    return torch.where(torch.isfinite(clip), scale, torch.nan)


def scale_of(clip: torch.Tensor, qmax: int) -> torch.Tensor:
    """The scale of slices clipped at `clip`: clip / qmax; 1 for an all-zero slice (clip 0);
    NaN where the clip is not finite."""
    return keep_nonfinite(torch.where(clip > 0, clip / qmax, 1.0), clip)


# --------------------------------------------------------------------------- clipping

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


def estimate_quartiles(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q1 and Q3 of |rows| along the last dimension, from a log2 histogram (no sort).

    rows: [R, C] float32. Returns two [R] tensors. Bin i of a row holds |x| / absmax in
    (2^-(i+1)/16, 2^-i/16], zeros (and values under absmax * 2^-40) the last bin; a quartile is
    the geometric middle of the bin holding the ceil(C/4)-th (Q1) or ceil(3C/4)-th (Q3)
    smallest |x|, and 0 for the last bin, so a row that is mostly zeros has Q1 = Q3 = 0 rather
    than a spurious tiny spread. Exact quartiles would need a sort of every row
    (torch.quantile refuses tensors over 16M elements).
    """
    mag = rows.abs()
    amax = mag.amax(dim=1, keepdim=True)
    safe_amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    # rank: the bin numbered from the smallest magnitudes up (0: the last bin), the order in
    # which a quartile's rank counts values: top - floor(-16 log2 r) = top + ceil(16 log2 r)
    # for r = |x| / absmax, exact in float32. Zeros (log2 = -inf) rank 0; a NaN ranks top (the
    # compare, unlike a clamp, sends it there).
    top = IQR_NUM_BINS - 1
    raw = (top + torch.ceil(torch.log2(mag / safe_amax) * IQR_BINS_PER_OCTAVE)).clamp_min(0)
    rank = torch.where(raw < top, raw, float(top))
    # Both quartiles at once, each counted in two levels: the octaves first, then the
    # sixteenths of the octave holding the quartile. Counts are compares summed over the row
    # (one fused reduction per level under Inductor, no scatter, no running sum); float32
    # counts are exact integers, and count >= p C is count >= ceil(p C). Run eagerly, this
    # is 72 passes over the row (about 3x the histograms' time): the price of one kernel.
    n = rows.shape[1]  # stays symbolic under dynamic shapes (float() would specialise it)
    targets = torch.arange(1, 4, 2, device=rows.device, dtype=torch.float32) * n / 4  # C/4, 3C/4
    octave_ends = torch.arange(
        IQR_BINS_PER_OCTAVE, IQR_NUM_BINS + 1, IQR_BINS_PER_OCTAVE, device=rows.device
    ).float()
    up_to_octave = (rank[:, None, :] < octave_ends[:, None]).sum(2, dtype=torch.float32)  # [R, 40]
    j = (up_to_octave[:, None, :] < targets[:, None]).sum(2)  # [R, 2]: first octave reaching it
    sixteenths = torch.arange(IQR_BINS_PER_OCTAVE, device=rows.device).float()
    # Values of lower octaves pass every compare, so these count from the smallest up.
    bin_ends = j[:, :, None].float() * IQR_BINS_PER_OCTAVE + sixteenths  # [R, 2, 16]
    up_to = (rank[:, None, None, :] <= bin_ends[..., None]).sum(3, dtype=torch.float32)
    reached = j * IQR_BINS_PER_OCTAVE + (up_to < targets[:, None]).sum(2)  # [R, 2]
    quartiles = []
    # One [R, 1] column at a time: exp2 of a wider tensor may take another vectorised path,
    # a last-bit difference.
    for r in reached.split(1, dim=1):
        middle = torch.exp2(-((top - r).float() + 0.5) / IQR_BINS_PER_OCTAVE)
        quartiles.append(torch.where(r == 0, 0.0, middle * amax).squeeze(1))
    return quartiles[0], quartiles[1]


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
    first = near_best.float().argmax(dim=1, keepdim=True)  # 0 (amax) when no cosine is finite
    # candidates[first] as a sum that adds exact zeros to it: a reduction, so the compiled
    # clip is one value per row in memory, where a gather is repeated as an indirect load in
    # every kernel that reads the clip.
    chosen = torch.arange(candidates.shape[1], device=rows.device) == first
    return torch.where(chosen, candidates, 0.0).sum(dim=1)


# --------------------------------------------------------------------------- quantize


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
    scale = row_values_like(scale_of(clip, spec.qmax), x32, dim, per_row)
    q = codes(x32 / scale, spec.rounding, spec.qmax)
    if spec.scaling:
        fitted = keep_nonfinite(least_squares_scale(rows, as_rows(q, dim, per_row)), clip)
        scale = row_values_like(fitted, x32, dim, per_row)
    return q.to(torch.int8), scale


def least_squares_scale(rows: torch.Tensor, q_rows: torch.Tensor) -> torch.Tensor:
    """argmin_s ||x - s q||^2 = <x, q> / <q, q> per row ([R, C] -> [R]); 1 where q is all zero."""
    numerator = (rows * q_rows).sum(dim=1)
    denominator = (q_rows * q_rows).sum(dim=1)
    return torch.where(denominator > 0, numerator / denominator, torch.ones_like(denominator))


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The values codes q stand for, q * scale, in float32."""
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


# --------------------------------------------------------------------------- IQS
#
# IQS: 16 logarithmic levels inside [Q1, Q3] (8 per sign, halving from the quartile down),
# and 240 uniform levels over the two outlier regions, split in proportion to how many values
# lie beyond each quartile: our reading of a secondary summary of GradQ-ViT's codebook
# (docs/method.md, Quantizers: clipping).
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
    return from_rows(nearest, x32, dim, per_row)


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


# --------------------------------------------------------------------------- fake quantization


def is_fake_quantized(a_spec: QuantSpec | None, b_spec: QuantSpec | None) -> bool:
    """Whether `quantized_matmul` runs this GEMM as fake quantization rather than INT8: an
    operand quantized upstream (None), below 8 bits, or with the IQS codebook."""
    specs = (a_spec, b_spec)
    if None in specs:
        return True
    return any(s.bits < 8 or s.clipping is Clipping.IQS for s in specs)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (float64), the measure tests put floors on."""
    ref = reference.double()
    noise = (ref - approximation.double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal.item() / noise.item())
