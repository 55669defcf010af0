"""Row quantization in one kernel: int8 codes, scales and least-squares statistics.

`quantize_rows(x, clip, bits, stochastic, seed, scaling, transpose)` quantizes a 2-D float x
[R, C] along its last dimension, one scale per row, exactly as `gradq_fx.quantizer.quantize`
does for that slice (the quantizer stays the one home of the math; this file reproduces it):

    scale = clip / qmax            where clip > 0, else 1; NaN where clip is not finite
    q     = clamp(round(x / scale), -qmax, qmax)   as int8, [R, C] (or q^T [C, R]); 0 in a
                                   row whose scale is NaN
    scale = <x, q> / <q, q>        only with `scaling`; 1 where <q, q> = 0; NaN as above

clip: [R] float32, one clipping value per row (from `quantizer.clip_value`, or for iqr from
its fused kernel in kernels/iqr.py: the clipping lives apart from the rounding); a 0-d
float32 tensor, one clip for the whole tensor (per_tensor; `scaling` is then per tensor too);
or None, and the kernel takes each row's absmax itself (minmax) in the same launch.
transpose: q comes out as q^T [C, R], the layout the wgrad GEMM reads, with the same codes
(stochastic ones included). Output scale: float32 [R] always (per-tensor scales repeated).

Numerical choices, and why the Triton kernel matches the reference:
- Divisions are IEEE float32 divisions rounded to nearest (`tl.math.div_rn`, as in
  `common.clip_scale`), as torch divides: scale and x / scale are bit-equal to the reference's.
- x / scale is clamped to [-qmax, qmax] *before* rounding. The bounds are integers, so
  round(clamp(v)) == clamp(round(v)) for both roundings, and |v| <= 127 is what the rounding
  below needs.
- Nearest rounding is round-half-to-even, like torch.round, by the float addition of
  `common.round_half_even` (valid for |v| < 2^22; no libdevice rint, which the interpreter
  lacks).
- Stochastic rounding is floor(v) + [u < v - floor(v)] with u ~ U[0, 1) from `tl.rand` (Philox)
  keyed by a seed tensor and the element's logical index r * C + c: it rounds up with
  probability frac(v), the distribution of the reference's floor(v + u), but the result is
  always floor(v) or ceil(v) (floor(v + u) in float32 can round v + u up to the next integer,
  so an exact integer v can move) and v - floor(v) is exact. The bits cannot equal
  torch.rand_like's: the reference path and the kernel agree in distribution only.
- <x, q> and <q, q> are float32 sums over column tiles: equal to the reference's sums to float
  rounding (summation order differs), so scaled scales match to a few ulp, not bit for bit.
  Per-tensor scaling adds the rows' sums in torch.
- Absmax is a max: exact in any order, so minmax clips (and their scales) are bit-equal.
- Non-finite values: a row holding a NaN or an Inf gets scale NaN and codes 0, as the
  reference gives (`quantizer.scale_of`, `quantizer.codes`), so the GEMM it feeds returns
  NaN where float would return a non-finite value. The in-kernel absmax cannot see a NaN (a
  GPU's max returns the other operand), so the same sweep flags the row when |x| < inf
  fails, which it does for NaN and for both infinities; a given clip flags itself.
"""

from __future__ import annotations

import torch

from gradq_fx import quantizer
from gradq_fx.config import Clipping, QuantSpec, Rounding
from gradq_fx.kernels import common
from gradq_fx.kernels.common import check_devices, check_rows, launches_triton, tl, triton

SEED_DTYPES = (torch.int32, torch.int64)


def check_quantize_args(x, clip, bits, stochastic, seed, scaling, transpose) -> None:
    """Raise ValueError, naming the argument, for inputs `quantize_rows` does not take."""
    check_rows("quantize_rows", x, bits)
    if clip is not None:
        if not isinstance(clip, torch.Tensor) or clip.dtype != torch.float32:
            raise ValueError(f"quantize_rows: clip must be a float32 tensor or None, got {clip!r}")
        if clip.shape not in ((), (x.shape[0],)):
            raise ValueError(
                f"quantize_rows: clip must have shape ({x.shape[0]},) (per row) or () (per "
                f"tensor) for x of shape {tuple(x.shape)}, got {tuple(clip.shape)}"
            )
    for name, flag in (("stochastic", stochastic), ("scaling", scaling), ("transpose", transpose)):
        if not isinstance(flag, bool):
            raise ValueError(f"quantize_rows: {name} must be True or False, got {flag!r}")
    if stochastic and (
        not isinstance(seed, torch.Tensor) or seed.dtype not in SEED_DTYPES or seed.numel() != 1
    ):
        raise ValueError(
            f"quantize_rows: stochastic rounding needs seed, a one-element int32/int64 "
            f"tensor, got {seed!r}"
        )
    tensors = {"x": x, "clip": clip, "seed": seed if stochastic else None}
    check_devices("quantize_rows", "x", tensors)


def quantize_rows_reference(
    x: torch.Tensor,
    clip: torch.Tensor | None = None,
    bits: int = 8,
    stochastic: bool = False,
    seed: torch.Tensor | None = None,
    scaling: bool = False,
    transpose: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` in torch, built from `gradq_fx.quantizer`'s functions.

    Bit-equal to `quantizer.quantize(x, spec, dim=-1)` for the matching spec. Stochastic
    rounding draws torch's generator, seeded from `seed` inside a forked RNG state, so one seed
    gives one result and the global generator is left alone.
    """
    check_quantize_args(x, clip, bits, stochastic, seed, scaling, transpose)
    qmax = common.qmax(bits)
    x32 = x.float()
    per_tensor = clip is not None and clip.dim() == 0
    if clip is None:
        clip = quantizer.clip_value(x32, QuantSpec(bits=bits, clipping=Clipping.MINMAX))
    clip = clip.reshape(-1)
    scale = quantizer.scale_of(clip, qmax)[:, None]  # [R, 1] or [1, 1]
    rounding = Rounding.STOCHASTIC if stochastic else Rounding.NEAREST
    if stochastic:
        with torch.random.fork_rng(devices=[x.device.index] if x.is_cuda else []):
            if x.is_cuda:
                torch.cuda.default_generators[x.device.index].manual_seed(int(seed.item()))
            else:
                torch.random.default_generator.manual_seed(int(seed.item()))
            q = quantizer.codes(x32 / scale, rounding, qmax)
    else:
        q = quantizer.codes(x32 / scale, rounding, qmax)
    if scaling:
        if per_tensor:
            fitted = quantizer.least_squares_scale(x32.reshape(1, -1), q.reshape(1, -1))
        else:
            fitted = quantizer.least_squares_scale(x32, q)
        scale = quantizer.keep_nonfinite(fitted, clip)[:, None]
    q = q.to(torch.int8)
    # Contiguous outputs, as the fake (and the kernel) give: x may be a transposed view.
    q = q.t() if transpose else q
    return q.contiguous(), scale.expand(x.shape[0], 1).reshape(-1).contiguous()


@torch.library.custom_op("gradq::quantize_rows", mutates_args=())
def quantize_rows(
    x: torch.Tensor,
    clip: torch.Tensor | None = None,
    bits: int = 8,
    stochastic: bool = False,
    seed: torch.Tensor | None = None,
    scaling: bool = False,
    transpose: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the rows of x [R, C] to int8 (module docstring): returns (q, scale).

    q: int8 [R, C], or [C, R] with `transpose`; scale: float32 [R]. Triton on CUDA tensors and
    under TRITON_INTERPRET=1 (`common.launches_triton`), else `quantize_rows_reference`.
    """
    if not launches_triton(x):
        return quantize_rows_reference(x, clip, bits, stochastic, seed, scaling, transpose)
    check_quantize_args(x, clip, bits, stochastic, seed, scaling, transpose)
    return _launch(x, clip, common.qmax(bits), stochastic, seed, scaling, transpose)


@quantize_rows.register_fake
def _(x, clip=None, bits=8, stochastic=False, seed=None, scaling=False, transpose=False):
    check_quantize_args(x, clip, bits, stochastic, seed, scaling, transpose)
    rows, cols = x.shape
    q = x.new_empty((cols, rows) if transpose else (rows, cols), dtype=torch.int8)
    return q, x.new_empty((rows,), dtype=torch.float32)


def _launch(x, clip, qmax, stochastic, seed, scaling, transpose):
    rows, cols = x.shape
    q = torch.empty((cols, rows) if transpose else (rows, cols), dtype=torch.int8, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return q, scale
    per_tensor = clip is not None and clip.dim() == 0
    # stats[0] = <x, q>, stats[1] = <q, q> per row: only read back for per-tensor scaling.
    stats = torch.empty((2, rows), dtype=torch.float32, device=x.device) if scaling else scale
    # q[r, c] lives at r * stride_qr + c * stride_qc, in either layout.
    stride_qr, stride_qc = (1, rows) if transpose else (cols, 1)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_R"]),)

    _quantize_rows_kernel[grid](
        x,
        clip if clip is not None else scale,  # unused placeholders keep the pointer list fixed
        seed if stochastic else scale,
        q,
        scale,
        stats,
        rows,
        cols,
        x.stride(0),
        x.stride(1),
        0 if clip is None or per_tensor else clip.stride(0),
        stride_qr,
        stride_qc,
        QMAX=qmax,
        HAS_CLIP=clip is not None,
        STOCHASTIC=stochastic,
        SCALING=scaling,
        ROW_SCALING=scaling and not per_tensor,
    )
    if scaling and per_tensor:
        dot, norm = stats.sum(dim=1)  # the rows' <x, q> and <q, q>, added: the tensor's
        ls = torch.where(norm > 0, dot / norm, torch.ones_like(norm))
        scale = quantizer.keep_nonfinite(ls, clip).expand(rows).contiguous()
    return q, scale


if triton is not None:
    # Tile shapes for CUDA: long rows take wide column tiles; transposed inputs and outputs
    # (wgrad operands) want many rows per tile so that loads and stores stay coalesced.
    _CUDA_CONFIGS = [
        triton.Config({"BLOCK_R": 1, "BLOCK_C": 2048}, num_warps=8),
        triton.Config({"BLOCK_R": 4, "BLOCK_C": 1024}, num_warps=4),
        triton.Config({"BLOCK_R": 16, "BLOCK_C": 256}, num_warps=4),
        # 8 warps: with 4, ptxas spills these two (tests/kernels/test_cuda_compile.py).
        triton.Config({"BLOCK_R": 32, "BLOCK_C": 128}, num_warps=8),
        triton.Config({"BLOCK_R": 64, "BLOCK_C": 64}, num_warps=8),
    ]
    _INTERPRETER_CONFIGS = [triton.Config({"BLOCK_R": 8, "BLOCK_C": 32})]

    @common.autotune(
        ["R", "C", "stride_xc", "stride_qc", "HAS_CLIP", "STOCHASTIC"],
        _CUDA_CONFIGS,
        _INTERPRETER_CONFIGS,
    )
    @triton.jit
    def _quantize_rows_kernel(
        # pointers
        x_ptr,
        clip_ptr,
        seed_ptr,
        q_ptr,
        scale_ptr,
        stats_ptr,
        # sizes
        R,
        C,
        # strides
        stride_xr,
        stride_xc,
        stride_clip,
        stride_qr,
        stride_qc,
        # meta-parameters
        QMAX: tl.constexpr,
        HAS_CLIP: tl.constexpr,
        STOCHASTIC: tl.constexpr,
        SCALING: tl.constexpr,
        ROW_SCALING: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        x_rows = x_ptr + rows64[:, None] * stride_xr

        if HAS_CLIP:
            clip = tl.load(clip_ptr + rows64 * stride_clip, mask=row_mask, other=0.0)
        else:
            # minmax: one sweep for each row's absmax (exact in any order), and whether the
            # row holds a NaN or an Inf (|x| < inf fails for both), which max cannot show.
            clip = tl.zeros([BLOCK_R], dtype=tl.float32)
            nonfinite = tl.zeros([BLOCK_R], dtype=tl.int32)
            for start in range(0, C, BLOCK_C):
                c = (start + cols).to(tl.int64)
                mask = row_mask[:, None] & (c < C)[None, :]
                x = tl.load(x_rows + c[None, :] * stride_xc, mask=mask, other=0.0)
                x = tl.abs(x.to(tl.float32))
                nonfinite = tl.maximum(nonfinite, tl.max(tl.where(x < float("inf"), 0, 1), axis=1))
                clip = tl.maximum(clip, tl.max(x, axis=1))
            clip = tl.where(nonfinite > 0, float("nan"), clip)
        finite = tl.abs(clip) < float("inf")  # False for a NaN clip too
        scale = tl.where(finite, common.clip_scale(clip, QMAX), float("nan"))

        if STOCHASTIC:
            seed = tl.load(seed_ptr)
        dot = tl.zeros([BLOCK_R], dtype=tl.float32)
        norm = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            c = (start + cols).to(tl.int64)
            mask = row_mask[:, None] & (c < C)[None, :]
            x = tl.load(x_rows + c[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
            v = tl.math.div_rn(x, scale[:, None])
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)  # before rounding: |v| < 2^22 below
            if STOCHASTIC:
                u = tl.rand(seed, rows64[:, None] * C + c[None, :])
                low = tl.floor(v)
                q = low + tl.where(u < v - low, 1.0, 0.0)
            else:
                q = common.round_half_even(v)
            q = tl.where(finite[:, None], q, 0.0)  # a NaN scale's codes: 0
            q_ptrs = q_ptr + rows64[:, None] * stride_qr + c[None, :] * stride_qc
            tl.store(q_ptrs, q.to(tl.int8), mask=mask)
            if SCALING:
                dot += tl.sum(tl.where(finite[:, None], x, 0.0) * q, axis=1)  # masked: 0
                norm += tl.sum(q * q, axis=1)

        if SCALING:
            tl.store(stats_ptr + rows64, dot, mask=row_mask)
            tl.store(stats_ptr + R + rows64, norm, mask=row_mask)
        if ROW_SCALING:
            safe_norm = tl.where(norm > 0, norm, 1.0)  # no 0 / 0 computed, even if discarded
            scale = tl.where(norm > 0, tl.math.div_rn(dot, safe_norm), 1.0)
            scale = tl.where(finite, scale, float("nan"))
        tl.store(scale_ptr + rows64, scale, mask=row_mask)
