"""gradq_fx.kernels.quantize: the Triton row quantizer against gradq_fx.quantizer.

Tests marked `interpret` run the Triton kernel in Triton's CPU interpreter (see conftest.py);
the others check the launcher's torch path, its validation and its registration; `gpu` tests
run the compiled kernel on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from gradq_fx import quantizer
from gradq_fx.config import Clipping, Granularity, QuantSpec, Rounding
from gradq_fx.kernels import triton_interpreting
from gradq_fx.kernels.quantize import quantize_rows, quantize_rows_reference
from tests.kernels.conftest import interpret, needs_cuda

# Rows x columns: primes, a ViT token count, single row / column, rows longer than the
# interpreter's 32-column tile and not a multiple of it.
SHAPES = [(1, 1), (13, 37), (197, 61), (16, 100), (3, 1031)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Exact halves of x / scale: with absmax 127 and qmax 127 the scale is 1, so these are v.
TIES = [127.0, -127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 100.5, -126.5, 0.0]


def make_rows(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with magnitudes over six decades, plus the hard cases where they fit:
    an all-zero row, an outlier row (one value 1e4 times the rest), a row of exact ties."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen)
    x *= 10.0 ** (torch.rand(rows, 1, generator=gen) * 6 - 3)
    if rows > 1:
        x[1] = 0.0
    if rows > 2:  # magnitude ~1, so the outlier (at most 4e4) stays finite in float16
        x[2] = torch.randn(cols, generator=gen).clamp(-4, 4)
        x[2, cols // 2] = 1e4 * x[2].abs().max()
    if rows > 3:
        ties = torch.tensor(TIES[:cols])
        x[3, : len(ties)] = ties
        x[3, len(ties) :] = 0.25
    return x.to(dtype)


def spec_and_clip(x: torch.Tensor, mode: str, bits: int = 8):
    """The QuantSpec the reference uses, and the `clip` argument the launcher gets."""
    x32 = x.float()
    if mode == "minmax_in_kernel":
        return QuantSpec(bits=bits), None
    if mode == "minmax":
        spec = QuantSpec(bits=bits)
        return spec, quantizer.clip_value(x32, spec)
    if mode == "iqr":
        spec = QuantSpec(bits=bits, clipping=Clipping.IQR)
        return spec, quantizer.clip_value(x32, spec)
    assert mode == "per_tensor"
    spec = QuantSpec(bits=bits, granularity=Granularity.PER_TENSOR)
    return spec, quantizer.clip_value(x32.reshape(1, -1), spec).reshape(())


MODES = ["minmax_in_kernel", "minmax", "iqr", "per_tensor"]


def expected(x, spec):
    q, scale = quantizer.quantize(x, spec, dim=-1)
    return q, scale.expand(x.shape[0], 1).reshape(-1)


def assert_same_quantization(q, scale, x, spec):
    q_ref, scale_ref = expected(x, spec)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.shape == x.shape and scale.shape == (x.shape[0],)
    mismatch = (q != q_ref).nonzero()
    assert mismatch.numel() == 0, f"codes differ at {mismatch[:5].tolist()}"
    assert torch.equal(scale, scale_ref)  # one correctly rounded division on both sides


def scaled_rtol(cols: int) -> float:
    """Bound on the relative difference of two least-squares scales summed in other orders.

    q has the sign of x, so <x, q> and <q, q> sum non-negative terms: each float32 sum is off
    by at most (C - 1) * 2^-24 relative, in any order; the quotient adds one rounding.
    """
    return (2 * cols + 1) * 2.0**-24


# -- the Triton kernel, in the interpreter -------------------------------------------------


@interpret
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols"), SHAPES, ids=str)
def test_kernel_matches_quantizer_bit_for_bit(rows, cols, dtype, mode):
    x = make_rows(rows, cols, dtype, seed=rows * cols)
    spec, clip = spec_and_clip(x, mode)
    q, scale = quantize_rows(x, clip)
    assert_same_quantization(q, scale, x, spec)


@interpret
@pytest.mark.parametrize("bits", [2, 4, 7])
@pytest.mark.parametrize("mode", ["minmax_in_kernel", "iqr"])
def test_kernel_fewer_bits(bits, mode):
    x = make_rows(13, 37, torch.float32, seed=bits)
    spec, clip = spec_and_clip(x, mode, bits)
    q, scale = quantize_rows(x, clip, bits=bits)
    assert_same_quantization(q, scale, x, spec)
    assert q.abs().max() <= spec.qmax


@interpret
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("mode", ["minmax_in_kernel", "per_tensor"])
@pytest.mark.parametrize(("rows", "cols"), [(13, 37), (197, 61)], ids=str)
def test_kernel_transposed_output_holds_the_same_codes(rows, cols, mode, stochastic):
    x = make_rows(rows, cols, torch.bfloat16, seed=rows)
    _, clip = spec_and_clip(x, mode)
    seed = torch.tensor([1234])
    q, scale = quantize_rows(x, clip, stochastic=stochastic, seed=seed)
    q_t, scale_t = quantize_rows(x, clip, stochastic=stochastic, seed=seed, transpose=True)
    assert q_t.shape == (cols, rows) and q_t.is_contiguous()
    assert torch.equal(q_t, q.t())
    assert torch.equal(scale_t, scale)


@interpret
def test_kernel_reads_strided_input():
    # A per-column quantization reads the columns of x [K, N] as rows of the view x.t().
    x = make_rows(61, 37, torch.float32, seed=5)
    q, scale = quantize_rows(x.t(), transpose=True)  # codes in x's own [K, N] layout
    assert_same_quantization(q.t(), scale, x.t().contiguous(), QuantSpec())


@interpret
@pytest.mark.parametrize("mode", ["minmax_in_kernel", "iqr", "per_tensor"])
@pytest.mark.parametrize(("rows", "cols"), [(13, 37), (197, 61), (3, 1031)], ids=str)
def test_kernel_least_squares_scaling(rows, cols, mode):
    x = make_rows(rows, cols, torch.float32, seed=cols)
    spec, clip = spec_and_clip(x, mode)
    spec = QuantSpec(granularity=spec.granularity, clipping=spec.clipping, scaling=True)
    q, scale = quantize_rows(x, clip, scaling=True)
    q_ref, scale_ref = expected(x, spec)
    assert torch.equal(q, q_ref)
    # Sums in another order: equal to float rounding (`scaled_rtol`), not bit for bit.
    reduced = rows * cols if mode == "per_tensor" else cols
    torch.testing.assert_close(scale, scale_ref, rtol=scaled_rtol(reduced), atol=0)
    if mode != "per_tensor":
        assert scale[1] == 1.0  # the all-zero row: <q, q> = 0


@interpret
def test_kernel_stochastic_rounding_is_floor_or_ceil_and_unbiased():
    # clip 127 with qmax 127 gives scale 1, so x is v itself: one fraction per row.
    fractions = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 0.999])
    cols = 2048
    base = torch.tensor([3.0, -7.0, 0.0, 100.0, -126.0, 41.0])
    x = (base + fractions)[:, None].expand(-1, cols).contiguous()
    clip = torch.full((len(base),), 127.0)
    q, scale = quantize_rows(x, clip, stochastic=True, seed=torch.tensor([2024]))
    assert torch.equal(scale, torch.ones(len(base)))
    v = x / scale[:, None]
    assert ((q.float() == v.floor()) | (q.float() == v.ceil())).all()
    assert torch.equal(q[0].float(), x[0])  # integers stay put
    # Unbiased: E[q] = v. The mean of n Bernoulli(f) draws has std sqrt(f (1 - f) / n).
    error = q.float().mean(dim=1) - v[:, 0]
    std = (fractions * (1 - fractions) / cols).sqrt()
    assert (error.abs() <= 5 * std + 1e-6).all(), (error, std)


@interpret
def test_kernel_stochastic_rounding_follows_the_seed():
    x = make_rows(13, 37, torch.float32, seed=3)
    q1, _ = quantize_rows(x, stochastic=True, seed=torch.tensor([1]))
    q1_again, _ = quantize_rows(x, stochastic=True, seed=torch.tensor([1], dtype=torch.int32))
    q2, _ = quantize_rows(x, stochastic=True, seed=torch.tensor([2]))
    assert torch.equal(q1, q1_again)
    assert not torch.equal(q1, q2)
    nearest, _ = quantize_rows(x)
    assert (q1.int() - nearest.int()).abs().max() <= 1


@interpret
def test_kernel_inside_torch_compile():
    x = make_rows(13, 37, torch.bfloat16, seed=9)

    def fn(x):
        q, scale = torch.ops.gradq.quantize_rows(x, None, 8, False, None, True, True)
        return q.float() * scale

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), fn(x))


# -- the launcher's torch path, validation, registration -----------------------------------


@pytest.mark.parametrize("scaling", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_reference_is_the_quantizer(mode, scaling):
    x = make_rows(13, 37, torch.bfloat16, seed=11)
    spec, clip = spec_and_clip(x, mode)
    spec = QuantSpec(granularity=spec.granularity, clipping=spec.clipping, scaling=scaling)
    q, scale = quantize_rows_reference(x, clip, scaling=scaling)
    q_ref, scale_ref = expected(x, spec)
    assert torch.equal(q, q_ref)
    assert torch.equal(scale, scale_ref)
    q_t, _ = quantize_rows_reference(x, clip, scaling=scaling, transpose=True)
    assert torch.equal(q_t, q.t())


def test_reference_stochastic_is_seeded_and_leaves_the_global_generator():
    x = make_rows(13, 37, torch.float32, seed=4)
    state = torch.random.get_rng_state()
    q1, scale = quantize_rows_reference(x, stochastic=True, seed=torch.tensor([5]))
    q2, _ = quantize_rows_reference(x, stochastic=True, seed=torch.tensor([5]))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(q1, q2)
    v = x / scale[:, None]
    assert ((q1.float() == v.floor()) | (q1.float() == v.ceil())).all()
    spec = QuantSpec(rounding=Rounding.STOCHASTIC)
    assert torch.equal(scale, expected(x, spec)[1])


def test_launcher_without_interpreter_runs_the_reference():
    if triton_interpreting():
        pytest.skip("this process runs the Triton kernel on CPU tensors")
    x = make_rows(13, 37, torch.float32, seed=6)
    clip = quantizer.clip_value(x, QuantSpec(clipping=Clipping.IQR))
    q, scale = quantize_rows(x, clip, scaling=True)
    q_ref, scale_ref = quantize_rows_reference(x, clip, scaling=True)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def test_registered_op_traces_with_symbolic_rows():
    x = make_rows(13, 37, torch.float16, seed=7)

    def fn(x):
        q, scale = torch.ops.gradq.quantize_rows(x, None, 8, False, None, False, True)
        return q.t().float() * scale[:, None]

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), fn(x))
    x = make_rows(29, 37, torch.float16, seed=8)
    assert torch.equal(compiled(x), fn(x))


_x = torch.ones(4, 6)
INVALID = [
    (dict(x=_x.long()), "x must be a 2-D float"),
    (dict(x=_x[None]), "x must be a 2-D float"),
    (dict(x=torch.ones(4, 0)), "x must have at least one column"),
    (dict(clip=torch.ones(4, dtype=torch.float64)), "clip must be a float32"),
    (dict(clip=torch.ones(3)), "clip must have shape"),
    (dict(clip=torch.ones(4, device="meta")), "clip is on meta"),
    (dict(bits=9), "bits must be an integer from 2 to 8"),
    (dict(bits=1), "bits must be an integer from 2 to 8"),
    (dict(stochastic=True), "needs seed"),
    (dict(stochastic=True, seed=torch.tensor([1.0])), "needs seed"),
    (dict(stochastic=True, seed=torch.tensor([1, 2])), "needs seed"),
    (dict(stochastic=True, seed=torch.tensor([1], device="meta")), "seed is on meta"),
]


@pytest.mark.parametrize(("kwargs", "match"), INVALID, ids=[m for _, m in INVALID])
@pytest.mark.parametrize("fn", [quantize_rows, quantize_rows_reference], ids=["op", "reference"])
def test_invalid_inputs_raise_value_error(fn, kwargs, match):
    kwargs = {"x": _x, **kwargs}
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)


NONFINITE = [float("nan"), float("inf"), float("-inf")]


def with_nonfinite(value: float, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (13 x 37) where rows 4 and 9 hold `value` once (row 9 in its last column), and
    which rows those are."""
    x = make_rows(13, 37, dtype, seed=5)
    x[4, 9] = value
    x[9, 36] = value
    bad = torch.zeros(13, dtype=torch.bool)
    bad[[4, 9]] = True
    return x, bad


def assert_nonfinite_rows(q, scale, x, spec, bad):
    """Rows holding a NaN or an Inf get scale NaN and codes 0; the other rows, the reference's
    quantization (bit for bit; least-squares scales to float rounding)."""
    q_ref, scale_ref = expected(x, spec)
    assert torch.isnan(scale_ref[bad]).all() and (q_ref[bad] == 0).all()  # the reference's rule
    assert torch.isnan(scale[bad]).all() and (q[bad] == 0).all()
    assert torch.equal(q[~bad], q_ref[~bad])
    rtol = scaled_rtol(x.shape[1]) if spec.scaling else 0.0
    torch.testing.assert_close(scale[~bad], scale_ref[~bad], rtol=rtol, atol=0)


@interpret
@pytest.mark.parametrize("scaling", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("mode", ["minmax_in_kernel", "iqr"])
@pytest.mark.parametrize("value", NONFINITE, ids=str)
def test_kernel_rows_with_nan_or_inf_get_a_nan_scale(value, mode, scaling):
    x, bad = with_nonfinite(value)
    spec, clip = spec_and_clip(x, mode)
    spec = QuantSpec(granularity=spec.granularity, clipping=spec.clipping, scaling=scaling)
    q, scale = quantize_rows(x, clip, scaling=scaling)
    assert_nonfinite_rows(q, scale, x, spec, bad)
    q_t, scale_t = quantize_rows(x, clip, scaling=scaling, transpose=True)
    assert torch.equal(q_t, q.t()) and torch.equal(scale_t.isnan(), scale.isnan())


@interpret
@pytest.mark.parametrize("scaling", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("value", NONFINITE, ids=str)
def test_kernel_per_tensor_with_nan_or_inf_is_nan_everywhere(value, scaling):
    x, _ = with_nonfinite(value, torch.bfloat16)
    spec, clip = spec_and_clip(x, "per_tensor")
    q, scale = quantize_rows(x, clip, scaling=scaling)
    assert torch.isnan(scale).all() and (q == 0).all()
    q_ref, scale_ref = expected(x, QuantSpec(granularity=spec.granularity, scaling=scaling))
    assert torch.isnan(scale_ref).all() and (q_ref == 0).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value", NONFINITE, ids=str)
def test_reference_carries_nan_and_inf_into_the_scale(value, mode):
    x, bad = with_nonfinite(value)
    spec, clip = spec_and_clip(x, mode)
    q, scale = quantize_rows_reference(x, clip)
    if mode == "per_tensor":
        assert torch.isnan(scale).all() and (q == 0).all()
    else:
        assert_nonfinite_rows(q, scale, x, spec, bad)


# -- the compiled kernel on CUDA -----------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols"), SHAPES + [(4096, 768), (768, 25216)], ids=str)
def test_cuda_kernel_matches_quantizer_bit_for_bit(rows, cols, dtype, mode):
    x = make_rows(rows, cols, dtype, seed=rows + cols).cuda()
    spec, clip = spec_and_clip(x, mode)
    q, scale = quantize_rows(x, clip)
    assert q.is_cuda
    assert_same_quantization(q, scale, x, spec)
    q_t, scale_t = quantize_rows(x, clip, transpose=True)
    assert torch.equal(q_t, q.t()) and torch.equal(scale_t, scale)
    spec = QuantSpec(granularity=spec.granularity, clipping=spec.clipping, scaling=True)
    q, scale = quantize_rows(x, clip, scaling=True)
    reduced = rows * cols if mode == "per_tensor" else cols
    torch.testing.assert_close(scale, expected(x, spec)[1], rtol=scaled_rtol(reduced), atol=0)


@pytest.mark.gpu
@needs_cuda
def test_cuda_kernel_stochastic_rounding():
    fractions = torch.tensor([0.0, 0.1, 0.5, 0.9])
    x = (torch.tensor([3.0, -7.0, 0.0, 100.0]) + fractions)[:, None].expand(-1, 1 << 16)
    x = x.contiguous().cuda()
    clip = torch.full((4,), 127.0, device="cuda")
    q, _ = quantize_rows(x, clip, stochastic=True, seed=torch.tensor([7], device="cuda"))
    assert ((q.float() == x.floor()) | (q.float() == x.ceil())).all()
    std = (fractions * (1 - fractions) / x.shape[1]).sqrt().cuda()
    assert ((q.float().mean(dim=1) - x[:, 0]).abs() <= 5 * std + 1e-6).all()
    q_t, _ = quantize_rows(
        x, clip, stochastic=True, seed=torch.tensor([7], device="cuda"), transpose=True
    )
    assert torch.equal(q_t, q.t())
