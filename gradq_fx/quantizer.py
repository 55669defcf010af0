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
"""

from __future__ import annotations

import math

import torch

from gradq_fx.config import Clipping, Granularity, QuantSpec, Rounding
from gradq_fx.kernels.int_mm import int8_gemm

# Fences tried by the `iqr` clipping: Q3 + k * IQR for k = 1, 2, 4, ..., 64 (k = 2^i, i below
# this count). The candidate with the best cosine similarity wins; the absmax (minmax) clip
# is always a candidate too, so `iqr` is never worse in cosine than `minmax` (up to the tie
# tolerance) under nearest rounding.
IQR_FENCE_COUNT = 7

# Quartiles come from a log2 histogram of |x| / absmax: 16 bins per octave over 40 octaves.
# A bin spans a factor 2^(1/16), so a quartile is off by at most 2.2% (bin's geometric middle);
# values below absmax * 2^-40 share the last bin, far under any useful clip.
_BINS_PER_OCTAVE = 16
_OCTAVES = 40
_NUM_BINS = _BINS_PER_OCTAVE * _OCTAVES
# Cosines closer than this to the best count as tied (float32 noise on a sum of C terms).
_COSINE_TIE = 1e-6


def _as_rows(x: torch.Tensor, dim: int, per_row: bool) -> torch.Tensor:
    """View x as [rows, reduced] with `dim` reduced: per row, or the whole tensor as one row."""
    if not per_row:
        return x.reshape(1, -1)
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def _from_rows(stat: torch.Tensor, x: torch.Tensor, dim: int, per_row: bool) -> torch.Tensor:
    """Inverse of `_as_rows` for a per-row statistic: a tensor broadcastable against x."""
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
    octaves_below = -torch.log2(mag / safe_amax) * _BINS_PER_OCTAVE
    bins = torch.nan_to_num(octaves_below, posinf=_NUM_BINS - 1).floor()
    bins = bins.clamp(0, _NUM_BINS - 1).long()
    counts = torch.zeros(rows.shape[0], _NUM_BINS, device=rows.device, dtype=torch.float32)
    counts.scatter_add_(1, bins, torch.ones_like(mag))
    # Ascending magnitude = descending bin index: accumulate from the last bin.
    from_smallest = counts.flip(1).cumsum(1)
    n = rows.shape[1]  # stays symbolic under dynamic shapes (float() would specialise it)

    def quantile(p: float) -> torch.Tensor:
        reached = (from_smallest >= p * n).float().argmax(dim=1)  # first bin reaching p
        bin_index = (_NUM_BINS - 1) - reached
        middle = torch.exp2(-(bin_index.float() + 0.5) / _BINS_PER_OCTAVE)
        # The last bin holds the zeros (and values under amax * 2^-40): call it 0, so a row
        # that is mostly zeros has Q1 = Q3 = 0 rather than a spurious tiny spread.
        return torch.where(reached == 0, 0.0, middle * amax.squeeze(1))

    return quantile(0.25), quantile(0.75)


def _round(x: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    if rounding is Rounding.NEAREST:
        return torch.round(x)  # half to even
    # Stochastic: floor(x + u), u ~ U[0, 1), so E[result] = x exactly.
    return torch.floor(x + torch.rand_like(x))


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
    scale = _safe_scale(candidates, spec.qmax)[:, :, None]
    restored = torch.round(rows[:, None, :] / scale).clamp(-spec.qmax, spec.qmax) * scale
    dot = (rows[:, None, :] * restored).sum(dim=2)
    cosine = dot / (rows.norm(dim=1, keepdim=True) * restored.norm(dim=2)).clamp_min(1e-30)
    # Cosine cannot see magnitude: a row with one nonzero value has cosine 1 at any clip,
    # however saturated. Among candidates within float noise of the best, take the largest.
    near_best = cosine >= cosine.amax(dim=1, keepdim=True) - _COSINE_TIE
    first = near_best.float().argmax(dim=1, keepdim=True)
    return candidates.gather(1, first).squeeze(1)


def _safe_scale(clip: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.where(clip > 0, clip / qmax, torch.ones_like(clip))


def quantize(x: torch.Tensor, spec: QuantSpec, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x with one scale per slice along `dim` (the contracted dimension).

    Returns (q, scale): q int8 with x's shape, scale float32 broadcastable against x (size 1
    along `dim`, and along every dimension for per_tensor). IQS has no integer form: see
    `simulate`.
    """
    if spec.clipping is Clipping.IQS:
        raise ValueError("quantize: the IQS codebook has no integer form; use simulate()")
    per_row = spec.granularity is Granularity.PER_ROW
    x32 = x.float()
    rows = _as_rows(x32, dim, per_row)
    scale = _from_rows(_safe_scale(clip_value(rows, spec), spec.qmax), x32, dim, per_row)
    q = _round(x32 / scale, spec.rounding).clamp(-spec.qmax, spec.qmax)
    if spec.scaling:
        scale = _from_rows(least_squares_scale(rows, _as_rows(q, dim, per_row)), x32, dim, per_row)
    return q.to(torch.int8), scale


def least_squares_scale(rows: torch.Tensor, q_rows: torch.Tensor) -> torch.Tensor:
    """argmin_s ||x - s q||^2 = <x, q> / <q, q> per row ([R, C] -> [R]); 1 where q is all zero."""
    numerator = (rows * q_rows).sum(dim=1)
    denominator = (q_rows * q_rows).sum(dim=1)
    return torch.where(denominator > 0, numerator / denominator, torch.ones_like(denominator))


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def quantization_stats(x: torch.Tensor, spec: QuantSpec, dim: int) -> torch.Tensor:
    """[cos(x, x_q), ||x - x_q||^2 / ||x||^2, 1] for x_q = dequantize(quantize(x, spec, dim)).

    The trailing 1 counts: summed over steps (as gradients accumulate) the vector holds the
    totals and the number of steps. An all-zero x counts as cosine 1, error 0.
    """
    x32 = x.float()
    restored = simulate(x, spec, dim)
    norms = x32.norm() * restored.norm()
    energy = x32.square().sum()
    cosine = torch.where(norms > 0, (x32 * restored).sum() / norms, 1.0)
    error = torch.where(energy > 0, (x32 - restored).square().sum() / energy, 0.0)
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
    rows = _as_rows(x32, dim, per_row)
    levels = iqs_codebook(rows)
    midpoints = (levels[:, 1:] + levels[:, :-1]) / 2
    index = torch.searchsorted(midpoints, rows.contiguous())
    nearest = levels.gather(1, index)
    if not per_row:
        return nearest.reshape(x32.shape)
    return nearest.reshape(x32.movedim(dim, -1).shape).movedim(-1, dim)


def simulate(x: torch.Tensor, spec: QuantSpec, dim: int) -> torch.Tensor:
    """What the GEMM sees of x after quantization, in float32 (any clipping, IQS included)."""
    if spec.clipping is Clipping.IQS:
        return iqs_simulate(x, dim, spec.granularity is Granularity.PER_ROW)
    return dequantize(*quantize(x, spec, dim))


def quantized_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    a_spec: QuantSpec,
    b_spec: QuantSpec,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """a @ b with both operands quantized (module docstring); output in a's dtype.

    With an IQS operand the GEMM is simulated: both operands decoded, float32 GEMM.
    """
    if Clipping.IQS in (a_spec.clipping, b_spec.clipping):
        out = torch.matmul(simulate(a, a_spec, dim=-1), simulate(b, b_spec, dim=-2))
    else:
        a_q, a_scale = quantize(a, a_spec, dim=-1)
        b_q, b_scale = quantize(b, b_spec, dim=-2)
        out = int8_gemm(a_q, b_q).float() * a_scale * b_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(a.dtype)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (float64), the measure tests put floors on."""
    ref = reference.double()
    noise = (ref - approximation.double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal.item() / noise.item())
