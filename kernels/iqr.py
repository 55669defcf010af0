"""The `iqr` clipping value of each row in one kernel: quartiles, fences and their scoring.

`iqr_clip_rows(x, bits)` returns, for a 2-D float x [R, C], what
`gradq_fx.quantizer.clip_value(x, QuantSpec(bits=bits, clipping=Clipping.IQR))` returns (the
quantizer stays the one home of the math; this file reproduces it):

    amax    = max |x|                                     per row
    bin     = floor(-16 log2(|x| / amax)), in [0, 639]    (zeros in the last bin)
    Q1, Q3  = amax 2^-(b + 1/2)/16 for b the bin of the ceil(C/4)-th and ceil(3C/4)-th
              smallest |x| (0 for the last bin)
    fences  = amax, then min(Q3 + 2^i (Q3 - Q1), amax) for i = 6, ..., 0 (amax if not > 0)
    clip    = the first fence whose nearest-rounded quantization of the row has the best
              cosine with it, within 1e-6

Under Inductor the reference counts each row by compares (against its 40 octaves' ends, then
the 16 bins' ends of each quartile's octave: two fused reductions over the row) and scores the
8 fences as a [R, 8, C] reduction. Here each program owns one row and sweeps it three times
(absmax; histogram, with `tl.histogram` in registers; the 8 fences side by side), so the row
is read from memory three times (the reference's compares sweep it once per octave and once
per bin).

Numerical choices, and how the kernel's clip compares with the reference's:
- Order statistics instead of a cumulative search: the bin of the k-th smallest |x| is the
  first bin, counting from the smallest magnitudes, whose running count reaches k. The
  reference asks for a count >= p C in float32, which for integer counts is count >= ceil(p C).
- |x| / amax is divided correctly rounded (`div_rn`) as torch divides; log2 and exp2 are the
  device's (approximate on a GPU): a value within an ulp of a bin edge, or a quartile within
  an ulp, can differ from torch's, which moves a fence by a relative 1e-7.
- The cosines are float32 sums in another order than torch's, so two fences whose cosines are
  within float noise of the 1e-6 tie band can be picked differently. Either is a fence the
  reference scores as (near-)best: tests bound the float64 cosine of the kernel's pick.
- 2^i is built from an integer shift, exact on every device; codes are rounded half to even
  (`common.round_half_even`) after a clamp to [-qmax, qmax], as in kernels/quantize.py.
- A row holding a NaN or an Inf gets a NaN clip. The reference's is not finite either (its
  absmax, and the fences capped at it: NaN, or Inf for a row whose worst value is an Inf),
  and either makes the row's scale NaN (`quantizer.scale_of`).
"""

from __future__ import annotations

import torch

from gradq_fx import quantizer
from gradq_fx.config import Clipping, QuantSpec
from gradq_fx.kernels import common
from gradq_fx.kernels.common import check_rows, launches_triton, tl, triton

# The histogram has the quantizer's 640 bins, padded to a power of two (as tl.histogram and
# tl.arange want): padding columns of the last tile land in the top bin, which no magnitude
# reaches. The 8 candidates (amax and 7 fences) are a power of two as well.
_HISTOGRAM_BINS = 1024


def iqr_clip_rows_reference(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """`iqr_clip_rows` in torch: `quantizer.clip_value` with `iqr` clipping."""
    check_rows("iqr_clip_rows", x, bits)
    return quantizer.clip_value(x.float(), QuantSpec(bits=bits, clipping=Clipping.IQR))


@torch.library.custom_op("gradq::iqr_clip_rows", mutates_args=())
def iqr_clip_rows(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The `iqr` clipping value of each row of x [R, C] (module docstring): float32 [R].

    Triton on CUDA tensors and under TRITON_INTERPRET=1 (`common.launches_triton`), else
    `iqr_clip_rows_reference`.
    """
    if not launches_triton(x):
        return iqr_clip_rows_reference(x, bits)
    check_rows("iqr_clip_rows", x, bits)
    rows, cols = x.shape
    clip = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _iqr_clip_kernel[(rows,)](
            x,
            clip,
            cols,
            x.stride(0),
            x.stride(1),
            K1=(cols + 3) // 4,  # ceil(C / 4): the rank of Q1 from the smallest
            K3=(3 * cols + 3) // 4,  # ceil(3 C / 4)
            QMAX=common.qmax(bits),
            BINS_PER_OCTAVE=quantizer.IQR_BINS_PER_OCTAVE,
            NUM_BINS=quantizer.IQR_NUM_BINS,
            CANDIDATES=quantizer.IQR_FENCE_COUNT + 1,
            COSINE_TIE=quantizer.IQR_COSINE_TIE,
            HISTOGRAM_BINS=_HISTOGRAM_BINS,
        )
    return clip


@iqr_clip_rows.register_fake
def _(x, bits=8):
    check_rows("iqr_clip_rows", x, bits)
    return x.new_empty((x.shape[0],), dtype=torch.float32)


if triton is not None:
    # One row per program. Rows of dgrad operands are short (channels), of wgrad operands long
    # (tokens): a tile of 1024 columns keeps both to a few sweeps of wide loads.
    _CUDA_CONFIGS = [
        triton.Config({"BLOCK_C": 1024}, num_warps=4),
        triton.Config({"BLOCK_C": 2048}, num_warps=8),
        triton.Config({"BLOCK_C": 512}, num_warps=4),
    ]
    _INTERPRETER_CONFIGS = [triton.Config({"BLOCK_C": 32})]

    @common.autotune(["C", "stride_xc"], _CUDA_CONFIGS, _INTERPRETER_CONFIGS)
    @triton.jit
    def _iqr_clip_kernel(
        # pointers
        x_ptr,
        clip_ptr,
        # sizes
        C,
        # strides
        stride_xr,
        stride_xc,
        # meta-parameters
        K1,
        K3,
        QMAX: tl.constexpr,
        BINS_PER_OCTAVE: tl.constexpr,
        NUM_BINS: tl.constexpr,
        CANDIDATES: tl.constexpr,
        COSINE_TIE: tl.constexpr,
        HISTOGRAM_BINS: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xr
        cols = tl.arange(0, BLOCK_C)

        # Sweep 1: the absmax (exact in any order), and whether the row holds a NaN or an Inf
        # (|x| < inf fails for both; a GPU's max would skip a NaN). Such a row's clip is NaN,
        # as the reference's is; its later sweeps read zeros in their place.
        amax = tl.zeros([BLOCK_C], dtype=tl.float32)
        nonfinite = tl.zeros([BLOCK_C], dtype=tl.int32)
        for start in range(0, C, BLOCK_C):
            c = (start + cols).to(tl.int64)
            x = tl.abs(tl.load(x_row + c * stride_xc, mask=c < C, other=0.0).to(tl.float32))
            nonfinite = tl.maximum(nonfinite, tl.where(x < float("inf"), 0, 1))
            amax = tl.maximum(amax, tl.where(x < float("inf"), x, 0.0))
        amax = tl.max(amax, axis=0)
        nonfinite = tl.max(nonfinite, axis=0)
        safe_amax = tl.where(amax > 0, amax, 1.0)

        # Sweep 2: the log2 histogram of |x| / amax (quantizer's bins).
        counts = tl.zeros([HISTOGRAM_BINS], dtype=tl.int32)
        for start in range(0, C, BLOCK_C):
            c = (start + cols).to(tl.int64)
            inside = c < C
            x = tl.load(x_row + c * stride_xc, mask=inside, other=0.0).to(tl.float32)
            x = tl.where(tl.abs(x) < float("inf"), x, 0.0)
            octaves_below = -tl.log2(tl.math.div_rn(tl.abs(x), safe_amax)) * BINS_PER_OCTAVE
            last = NUM_BINS - 1.0
            bins = tl.minimum(tl.maximum(tl.floor(octaves_below), 0.0), last)  # 0: +inf -> last
            bins = tl.where(inside, bins.to(tl.int32), HISTOGRAM_BINS - 1)
            counts += tl.histogram(bins, HISTOGRAM_BINS)
        # Bins count down in magnitude: the values at or below bin b (in magnitude) are the
        # counts of bins >= b, which is C less the running count of bins < b (the padding
        # sits in the top bin, above every real one, and C excludes it).
        b = tl.arange(0, HISTOGRAM_BINS)
        at_or_below = C - tl.cumsum(counts, axis=0) + counts
        b1 = tl.max(tl.where((b < NUM_BINS) & (at_or_below >= K1), b, 0), axis=0)
        b3 = tl.max(tl.where((b < NUM_BINS) & (at_or_below >= K3), b, 0), axis=0)
        # The last bin (zeros, and values under amax * 2^-40) counts as 0.
        middle1 = tl.exp2(-(b1.to(tl.float32) + 0.5) / BINS_PER_OCTAVE)
        middle3 = tl.exp2(-(b3.to(tl.float32) + 0.5) / BINS_PER_OCTAVE)
        q1 = tl.where(b1 == NUM_BINS - 1, 0.0, middle1 * amax)
        q3 = tl.where(b3 == NUM_BINS - 1, 0.0, middle3 * amax)

        # The candidates, largest first: amax, then Q3 + 2^i IQR for i = CANDIDATES - 2, ..., 0.
        f = tl.arange(0, CANDIDATES)
        power = (1 << (CANDIDATES - 1 - f)).to(tl.float32)  # exact; unused for f = 0
        fences = q3 + power * (q3 - q1)
        fences = tl.where(fences > 0, tl.minimum(fences, amax), amax)
        candidates = tl.where(f == 0, amax, fences)
        scale = common.clip_scale(candidates, QMAX)

        # Sweep 3: each candidate's nearest-rounded quantization, scored by its cosine.
        dot = tl.zeros([CANDIDATES], dtype=tl.float32)
        restored_sq = tl.zeros([CANDIDATES], dtype=tl.float32)
        x_sq = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            c = (start + cols).to(tl.int64)
            x = tl.load(x_row + c * stride_xc, mask=c < C, other=0.0).to(tl.float32)
            x = tl.where(tl.abs(x) < float("inf"), x, 0.0)
            v = tl.math.div_rn(x[None, :], scale[:, None])
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)  # before rounding: |v| < 2^22 below
            restored = common.round_half_even(v) * scale[:, None]
            dot += tl.sum(x[None, :] * restored, axis=1)  # padding: x = 0, restored = 0
            restored_sq += tl.sum(restored * restored, axis=1)
            x_sq += x * x
        norms = tl.sqrt(tl.sum(x_sq, axis=0)) * tl.sqrt(restored_sq)
        cosine = dot / tl.maximum(norms, 1e-30)
        near_best = cosine >= tl.max(cosine, axis=0) - COSINE_TIE
        first = tl.min(tl.where(near_best, f, CANDIDATES), axis=0)
        clip = tl.sum(tl.where(f == first, candidates, 0.0), axis=0)
        tl.store(clip_ptr + row, tl.where(nonfinite > 0, float("nan"), clip))
