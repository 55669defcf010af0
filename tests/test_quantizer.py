"""gradq_fx.quantizer against references written here, in float64 / int64.

Reference quantizer (module docstring of gradq_fx.quantizer): one float32 scale per slice,
scale = absmax / qmax (1 for an all-zero slice), q = clamp(round_half_even(x / scale)).
The reference divides in float64 and rounds once to float32: for float32 operands that equals
float32 division exactly (53 >= 2 * 24 + 2, so the double rounding is innocuous).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gradq_fx import quantizer
from gradq_fx.config import Clipping, Granularity, QuantSpec, Rounding

PER_TENSOR, PER_ROW = Granularity.PER_TENSOR, Granularity.PER_ROW
# The clippings with an integer form (IQS, the non-uniform codebook, is tested on its own).
UNIFORM_CLIPPINGS = (Clipping.MINMAX, Clipping.IQR)


def spec_of(bits=8, granularity=PER_ROW, rounding=Rounding.NEAREST, clipping=Clipping.MINMAX):
    return QuantSpec(bits, granularity, rounding, clipping)


# --------------------------------------------------------------------------- references


def ref_scale(x: torch.Tensor, bits: int, per_row: bool, dim: int) -> torch.Tensor:
    """float32 scale, shaped like quantize()'s: size 1 along dim (along every dim if per_tensor)."""
    qmax = 2 ** (bits - 1) - 1
    x64 = x.double()
    if per_row:
        absmax = x64.abs().amax(dim=dim, keepdim=True)
    else:
        absmax = x64.abs().amax().reshape([1] * x.dim())
    return torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax)).float()


def ref_quantize(x: torch.Tensor, bits: int, per_row: bool, dim: int):
    """Nearest rounding, minmax clipping: (q int8, scale float32)."""
    qmax = 2 ** (bits - 1) - 1
    scale = ref_scale(x, bits, per_row, dim)
    ratio = (x.double() / scale.double()).float().double()  # the float32 quotient
    q = torch.round(ratio).clamp(-qmax, qmax)  # torch.round: half to even
    return q.to(torch.int8), scale


def ref_quantized_matmul(a, b, bits_a, bits_b, per_row_a, per_row_b, bias=None):
    """a @ b from an int64 GEMM of the reference-quantized operands; float64 result."""
    qa, sa = ref_quantize(a, bits_a, per_row_a, dim=-1)
    qb, sb = ref_quantize(b, bits_b, per_row_b, dim=-2)
    acc = torch.matmul(qa.long(), qb.long())
    out = acc.double() * sa.double() * sb.double()
    if bias is not None:
        out = out + bias.double()
    return out


def sqnr64(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    ref = reference.double()
    err = ref - approximation.double()
    noise = float((err * err).sum())
    return math.inf if noise == 0 else 10.0 * math.log10(float((ref * ref).sum()) / noise)


def cosine64(x: torch.Tensor, y: torch.Tensor, dim=None) -> torch.Tensor:
    x, y = x.double(), y.double()
    if dim is None:
        x, y = x.reshape(1, -1), y.reshape(1, -1)
        dim = 1
    return (x * y).sum(dim) / (x.norm(dim=dim) * y.norm(dim=dim))


def varied_rows(*shape, generator_seed=0):
    """Gaussian values with per-slice magnitudes spread over 6 decades (both last two dims)."""
    torch.manual_seed(generator_seed)
    x = torch.randn(*shape)
    x = x * 10 ** torch.empty(*shape[:-1], 1).uniform_(-3, 3)
    if x.dim() >= 2:
        x = x * 10 ** torch.empty(*shape[:-2], 1, shape[-1]).uniform_(-1, 1)
    return x


# --------------------------------------------------------------------------- quantize: exact

SHAPES = [(197, 64), (13, 7), (1, 31), (2, 197, 17)]


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("granularity", [PER_TENSOR, PER_ROW], ids=lambda g: g.value)
@pytest.mark.parametrize("dim", [-1, -2])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_nearest_minmax_matches_reference(shape, dim, granularity, bits):
    x = varied_rows(*shape, generator_seed=bits)
    per_row = granularity is PER_ROW
    q, scale = quantizer.quantize(x, spec_of(bits, granularity), dim=dim)
    q_ref, scale_ref = ref_quantize(x, bits, per_row, dim)

    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32
    assert scale.shape == scale_ref.shape
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)
    # And in plain float64 terms: every q is within half a step of x / scale.
    ratio = x.double() / scale.double()
    assert ((q.double() - ratio).abs() <= 0.5 + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_low_precision_input(dtype):
    x = varied_rows(2, 197, 17, generator_seed=3).to(dtype)
    q, scale = quantizer.quantize(x, spec_of(8, PER_ROW), dim=-2)
    q_ref, scale_ref = ref_quantize(x, 8, True, -2)
    assert scale.dtype == torch.float32
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)


def test_quantize_rounds_half_to_even():
    # absmax 127 at 8 bits makes the scale exactly 1, so x / scale is exact.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, -126.5]])
    q, scale = quantizer.quantize(x, spec_of(8, PER_ROW), dim=-1)
    assert scale.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3, -126]]


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim", [-1, -2])
def test_quantize_zero_slice_and_outlier_slice(bits, dim):
    qmax = 2 ** (bits - 1) - 1
    torch.manual_seed(1)
    x = torch.randn(13, 7)
    if dim == -1:
        x[3] = 0.0  # an all-zero row
        x[5, 2] = 1e4  # a row with one huge value
        zero, outlier = (3, slice(None)), (5, slice(None))
    else:
        x[:, 3] = 0.0
        x[2, 5] = 1e4
        zero, outlier = (slice(None), 3), (slice(None), 5)
    q, scale = quantizer.quantize(x, spec_of(bits, PER_ROW), dim=dim)
    q_ref, scale_ref = ref_quantize(x, bits, True, dim)
    assert torch.equal(q, q_ref)
    assert torch.equal(scale, scale_ref)
    # The zero slice: scale 1, all q 0.
    assert (scale[zero] == 1.0).all()
    assert (q[zero] == 0).all()
    # The outlier slice: scale 1e4 / qmax, the outlier at +qmax.
    assert torch.allclose(scale[outlier].double(), torch.tensor(1e4 / qmax, dtype=torch.float64))
    assert q.max().item() == qmax
    # The other slices do not see the outlier: their absmax maps to +-qmax.
    slices = q.movedim(dim, -1)  # one slice per row
    others = [i for i in range(slices.shape[0]) if i not in (3, 5)]
    assert (slices[others].abs().amax(dim=-1) == qmax).all()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantize_all_zero_tensor_per_tensor(bits):
    x = torch.zeros(4, 9)
    q, scale = quantizer.quantize(x, spec_of(bits, PER_TENSOR), dim=-1)
    assert (q == 0).all() and scale.shape == (1, 1) and scale.item() == 1.0


def test_quantize_per_tensor_outlier_dominates():
    torch.manual_seed(2)
    x = torch.randn(13, 7)
    x[5, 2] = 1e4
    q, scale = quantizer.quantize(x, spec_of(8, PER_TENSOR), dim=-1)
    assert scale.item() == pytest.approx(1e4 / 127, rel=1e-7)
    assert q[5, 2].item() == 127
    # |randn| < 40 and scale ~ 78.7: everything else rounds to zero.
    q_rest = q.clone()
    q_rest[5, 2] = 0
    assert (q_rest == 0).all()


def test_dequantize():
    q = torch.tensor([[-127, 0, 5], [1, 2, 3]], dtype=torch.int8)
    scale = torch.tensor([[0.5], [2.0]])
    assert torch.equal(quantizer.dequantize(q, scale), torch.tensor([[-63.5, 0, 2.5], [2, 4, 6.0]]))


# --------------------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", [PER_TENSOR, PER_ROW], ids=lambda g: g.value)
def test_stochastic_rounding_is_unbiased(bits, granularity):
    torch.manual_seed(0)
    x = torch.randn(32, 64) * torch.rand(32, 1) * 3
    spec = spec_of(bits, granularity, Rounding.STOCHASTIC)
    draws = 2000
    x64 = x.double()
    total = torch.zeros_like(x64)
    total_sq = torch.zeros_like(x64)
    for _ in range(draws):
        q, scale = quantizer.quantize(x, spec, dim=-1)
        ratio = x64 / scale.double()
        # Every q is one of the two integers around x / scale.
        assert ((q.double() - ratio).abs() <= 1 + 1e-5).all()
        restored = quantizer.dequantize(q, scale).double()
        total += restored
        total_sq += restored * restored
    scale64 = scale.double().expand_as(x64)
    mean = total / draws
    var = (total_sq / draws - mean * mean).clamp_min(0) * draws / (draws - 1)
    standard_error = (var / draws).sqrt()
    # 5 standard errors, plus 3 / draws of a step for values so close to a level that no
    # draw left it (the "rule of three" bound on an unseen event's probability).
    bound = 5 * standard_error + 3 * scale64 / draws + 1e-6 * scale64
    assert ((mean - x64).abs() <= bound).all()
    # The scale is minmax's, unchanged by the rounding mode.
    assert torch.equal(scale, ref_scale(x, bits, granularity is PER_ROW, -1))
    # Unbiased in aggregate, unlike round-to-nearest whose error does not average away.
    q_nearest, _ = ref_quantize(x, bits, granularity is PER_ROW, -1)
    nearest_error = (q_nearest.double() * scale64 - x64).abs().mean()
    assert (mean - x64).abs().mean() < 0.1 * nearest_error


def test_stochastic_rounding_is_random_and_reproducible():
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(4))
    spec = spec_of(8, PER_ROW, Rounding.STOCHASTIC)
    torch.manual_seed(123)
    first, _ = quantizer.quantize(x, spec, dim=-1)
    second, _ = quantizer.quantize(x, spec, dim=-1)
    torch.manual_seed(123)
    again, _ = quantizer.quantize(x, spec, dim=-1)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


# --------------------------------------------------------------------------- quartiles


def _quartile_errors(rows: torch.Tensor):
    q1, q3 = quantizer.estimate_quartiles(rows)
    assert q1.shape == q3.shape == (rows.shape[0],)
    probs = torch.tensor([0.25, 0.75], dtype=torch.float64)
    exact = torch.quantile(rows.abs().double(), probs, dim=1)
    return (q1.double() / exact[0] - 1).abs(), (q3.double() / exact[1] - 1).abs()


def _gaussian(seed):
    return torch.randn(1, 197 * 768, generator=torch.Generator().manual_seed(seed))


def _heavy_tailed(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 197 * 768, generator=gen) * torch.rand(1, 197 * 768, generator=gen) ** 8


def _per_row(seed):
    gen = torch.Generator().manual_seed(seed)
    magnitudes = 10 ** torch.empty(16, 1).uniform_(-4, 4, generator=gen)
    return torch.randn(16, 65536, generator=gen) * magnitudes


def _per_row_heavy(seed):
    gen = torch.Generator().manual_seed(seed)
    magnitudes = 10 ** torch.empty(16, 1).uniform_(-4, 4, generator=gen)
    return (
        torch.randn(16, 65536, generator=gen)
        * torch.rand(16, 65536, generator=gen) ** 8
        * (magnitudes)
    )


@pytest.mark.parametrize("make", [_gaussian, _heavy_tailed, _per_row, _per_row_heavy])
@pytest.mark.parametrize("seed", [0, 1])
def test_estimate_quartiles_close_to_exact(make, seed):
    # Histogram bins span 2^(1/16): at most 2.2% off, plus a hair of rank mismatch
    # (measured worst 2.38% over 5 seeds with 65536 elements per row).
    err1, err3 = _quartile_errors(make(seed))
    assert err1.max() <= 0.025
    assert err3.max() <= 0.025


def test_estimate_quartiles_zero_rows():
    torch.manual_seed(0)
    rows = torch.randn(4, 4096)
    rows[1] = 0.0
    rows[3] = 0.0
    q1, q3 = quantizer.estimate_quartiles(rows)
    assert q1[1] == 0 and q3[1] == 0 and q1[3] == 0 and q3[3] == 0
    err1, err3 = _quartile_errors(rows[[0, 2]])
    assert err1.max() <= 0.05 and err3.max() <= 0.05  # 4096 per row: looser rank mismatch
    assert (q1[[0, 2]] < q3[[0, 2]]).all()


def test_estimate_quartiles_scale_invariant_rows():
    # Each row's estimate must depend on that row only.
    torch.manual_seed(5)
    base = torch.randn(1, 8192)
    rows = torch.cat([base, base * 1e-3, base * 1e3, -base])
    q1, q3 = quantizer.estimate_quartiles(rows)
    factors = torch.tensor([1.0, 1e-3, 1e3, 1.0])
    torch.testing.assert_close(q1, q1[0] * factors, rtol=1e-5, atol=0)
    torch.testing.assert_close(q3, q3[0] * factors, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- clip_value


def _with_outliers(shape, count, amplitude, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    index = torch.randperm(x.numel(), generator=gen)[:count]
    signs = torch.randint(0, 2, (count,), generator=gen).float() * 2 - 1
    x.view(-1)[index] = amplitude * signs
    return x


def _clip_inputs():
    gen = torch.Generator().manual_seed(11)
    return {
        "gaussian": torch.randn(64, 512, generator=gen),
        "heavy": torch.randn(64, 512, generator=gen) * torch.rand(64, 512, generator=gen) ** 8,
        "outliers": _with_outliers((64, 512), 40, 50.0, seed=12),
        "scaled_rows": torch.randn(64, 512, generator=gen)
        * 10 ** torch.empty(64, 1).uniform_(-3, 3, generator=gen),
    }


CLIP_INPUTS = _clip_inputs()


@pytest.mark.parametrize("name", sorted(CLIP_INPUTS))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", [PER_TENSOR, PER_ROW], ids=lambda g: g.value)
def test_iqr_cosine_never_below_minmax(name, bits, granularity):
    x = CLIP_INPUTS[name]
    restored = {}
    for clipping in UNIFORM_CLIPPINGS:
        q, scale = quantizer.quantize(x, spec_of(bits, granularity, clipping=clipping), dim=-1)
        restored[clipping] = quantizer.dequantize(q, scale)
    dim = 1 if granularity is PER_ROW else None
    cos_iqr = cosine64(x, restored[Clipping.IQR], dim)
    cos_minmax = cosine64(x, restored[Clipping.MINMAX], dim)
    assert (cos_iqr >= cos_minmax - 1e-6).all()


@pytest.mark.parametrize("name", sorted(CLIP_INPUTS))
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_clip_value_bounded_by_absmax(name, bits):
    rows = CLIP_INPUTS[name]
    absmax = rows.abs().amax(dim=1)
    minmax = quantizer.clip_value(rows, spec_of(bits, clipping=Clipping.MINMAX))
    iqr = quantizer.clip_value(rows, spec_of(bits, clipping=Clipping.IQR))
    assert minmax.shape == iqr.shape == absmax.shape
    assert torch.equal(minmax, absmax)
    assert (iqr <= absmax).all()
    assert (iqr > 0).all()


@pytest.mark.parametrize(
    ("shape", "bits", "amplitude", "margin_db"),
    [
        # Measured over 8 seeds: minmax 23.4 dB, iqr 24.0 dB (8 bits, 8 outliers at +-30).
        ((256, 1024), 8, 30.0, 0.25),
        # Measured over 8 seeds: minmax 3.1 dB, iqr 8.2 dB (4 bits, 8 outliers at +-20).
        ((197, 64), 4, 20.0, 3.0),
    ],
)
def test_iqr_beats_minmax_sqnr_with_outliers(shape, bits, amplitude, margin_db):
    x = _with_outliers(shape, 8, amplitude, seed=3)
    sqnr = {}
    for clipping in UNIFORM_CLIPPINGS:
        spec = spec_of(bits, PER_TENSOR, clipping=clipping)
        q, scale = quantizer.quantize(x, spec, dim=-1)
        sqnr[clipping] = sqnr64(x, quantizer.dequantize(q, scale))
    assert sqnr[Clipping.IQR] > sqnr[Clipping.MINMAX] + margin_db
    clip = quantizer.clip_value(x.reshape(1, -1), spec_of(bits, PER_TENSOR, clipping=Clipping.IQR))
    assert clip.item() < amplitude  # it did clip the outliers


def _sparse_one_value():
    x = torch.zeros(3, 394)
    x[0, 17] = 0.37
    x[1, 0] = -2.5e-3
    x[2, 393] = 1e3
    return x, 8


def _sparse_equal_pair():
    x = torch.zeros(2, 394)
    x[0, 3], x[0, 200] = 0.5, -0.5
    x[1, 7], x[1, 8] = 0.1, 0.1
    return x, 8


def _sparse_near_equal_triple():
    # Over 3/4 of the row is zero, the three nonzeros within 0.5% of each other in magnitude.
    x = torch.zeros(2, 197)
    x[0, :3] = torch.tensor([0.9927664399147034, -0.9964504837989807, -0.9915223717689514])
    x[1, 50:53] = torch.tensor([-0.9891902804374695, -0.985321044921875, -0.9849389791488647])
    return x, 8


def _sparse_pair_low_bits():
    x = torch.zeros(2, 197)
    x[0, :2] = torch.tensor([-0.883059024810791, -0.8190968036651611])
    x[1, 9:11] = torch.tensor([0.9111682176589966, -0.9830206036567688])
    return x, 4


def _one_outlier_low_bits():
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    x[:, 5] = torch.tensor([1e4, -1e4, 1e4, -1e4])
    return x, 4


@pytest.mark.parametrize(
    "make",
    [
        _sparse_one_value,
        _sparse_equal_pair,
        _sparse_near_equal_triple,
        _sparse_pair_low_bits,
        _one_outlier_low_bits,
    ],
)
def test_iqr_keeps_magnitude_where_clipping_cannot_help(make):
    # Rows whose energy sits in a few values: minmax is (near) lossless, and a clip below
    # those values can only shrink the row. Cosine similarity cannot see the shrinkage (it
    # is scale-invariant): a fence that saturates every nonzero value scores the cosine of
    # sign(x), which for near-equal magnitudes ties with, or beats, absmax's rounding. When
    # over 3/4 of a row is zero its quartiles (and so every IQR fence) sit at ~1e-12 * absmax.
    # The chosen clip must still keep the row's magnitude.
    x, bits = make()
    per_row_sqnr = {}
    for clipping in UNIFORM_CLIPPINGS:
        q, scale = quantizer.quantize(x, spec_of(bits, PER_ROW, clipping=clipping), dim=-1)
        restored = quantizer.dequantize(q, scale).double()
        per_row_sqnr[clipping] = [sqnr64(x[i], restored[i]) for i in range(x.shape[0])]
    # minmax keeps 25 dB (4 bits) to lossless; a collapsed row keeps 0 dB.
    assert min(per_row_sqnr[Clipping.MINMAX]) >= 20.0
    assert min(per_row_sqnr[Clipping.IQR]) >= 15.0, per_row_sqnr[Clipping.IQR]


# --------------------------------------------------------------------------- quantized_matmul

COMBOS = list(itertools.product([PER_TENSOR, PER_ROW], UNIFORM_CLIPPINGS, Rounding))

# Floors in dB, about 4 dB under the SQNR measured with seed 0 (lowest over 20 seeds in
# brackets): 2-D (197,64)x(64,37) and 4-D (2,3,197,16)x(2,3,16,197), 8 bits both operands.
SQNR_FLOORS = {
    # (granularity, rounding): (floor 2-D, floor 4-D)
    (PER_TENSOR, Rounding.NEAREST): (33.5, 33.0),  # measured 37.7 [37.2], 37.3 [36.8]
    (PER_TENSOR, Rounding.STOCHASTIC): (30.5, 30.0),  # measured 34.7 [34.1], 34.2 [33.8]
    (PER_ROW, Rounding.NEAREST): (37.5, 39.5),  # measured 41.5 [41.4], 43.6 [43.5]
    (PER_ROW, Rounding.STOCHASTIC): (34.5, 36.5),  # measured 38.5 [38.2], 40.6 [40.5]
}


def _operands(batched: bool):
    torch.manual_seed(0)
    if batched:
        return torch.randn(2, 3, 197, 16), torch.randn(2, 3, 16, 197)
    return torch.randn(197, 64), torch.randn(64, 37)


@pytest.mark.parametrize("batched", [False, True], ids=["2d", "4d"])
@pytest.mark.parametrize(
    ("granularity", "clipping", "rounding"),
    COMBOS,
    ids=[f"{g.value}-{c.value}-{r.value}" for g, c, r in COMBOS],
)
def test_quantized_matmul_sqnr_floor(batched, granularity, clipping, rounding):
    a, b = _operands(batched)
    spec = spec_of(8, granularity, rounding, clipping)
    out = quantizer.quantized_matmul(a, b, spec, spec)
    reference = a.double() @ b.double()
    assert out.shape == reference.shape
    assert out.dtype == torch.float32
    floor = SQNR_FLOORS[(granularity, rounding)][int(batched)]
    assert quantizer.sqnr_db(reference, out) >= floor


def test_sqnr_db_matches_float64_formula():
    torch.manual_seed(7)
    reference = torch.randn(197, 37, dtype=torch.float64)
    approximation = (reference + 0.01 * torch.randn(197, 37, dtype=torch.float64)).float()
    expected = sqnr64(reference, approximation)
    assert quantizer.sqnr_db(reference, approximation) == pytest.approx(expected, rel=1e-12)
    assert 38.0 < expected < 42.0  # noise 1% of the signal's rms: about 40 dB
    assert quantizer.sqnr_db(reference, reference) == math.inf


EXACT_CASES = [
    ((197, 64), (64, 37), 8, 8),
    ((17, 13), (13, 5), 8, 8),
    ((1, 31), (31, 3), 8, 8),
    ((197, 64), (64, 37), 4, 8),
    ((2, 3, 197, 16), (2, 3, 16, 197), 8, 8),
    ((2, 197, 17), (2, 17, 9), 2, 4),
]


@pytest.mark.parametrize(("shape_a", "shape_b", "bits_a", "bits_b"), EXACT_CASES, ids=str)
@pytest.mark.parametrize("granularity", [PER_TENSOR, PER_ROW], ids=lambda g: g.value)
def test_quantized_matmul_nearest_minmax_equals_integer_reference(
    shape_a, shape_b, bits_a, bits_b, granularity
):
    a = varied_rows(*shape_a, generator_seed=1)
    b = varied_rows(*shape_b, generator_seed=2)
    per_row = granularity is PER_ROW
    out = quantizer.quantized_matmul(
        a, b, spec_of(bits_a, granularity), spec_of(bits_b, granularity)
    )
    expected = ref_quantized_matmul(a, b, bits_a, bits_b, per_row, per_row)
    if min(bits_a, bits_b) == 8:
        # INT8 GEMM, products only (no sums in float): two float32 multiplies at most.
        torch.testing.assert_close(out.double(), expected, rtol=3e-7, atol=0)
        return
    assert_fake_quant_close(out, expected, a, b, bits_a, bits_b, per_row, per_row)


def assert_fake_quant_close(out, expected, a, b, bits_a, bits_b, per_row_a, per_row_b):
    """Below 8 bits quantized_matmul is fake quantization, a float32 GEMM of the dequantized
    operands. Its sums round: at most K ulps of the sum of |terms| (a loose float32 bound)."""
    magnitude = ref_quantized_matmul(a.abs(), b.abs(), bits_a, bits_b, per_row_a, per_row_b)
    bound = a.shape[-1] * 2.0**-24 * magnitude
    assert bool(((out.double() - expected).abs() <= bound).all())


def test_quantized_matmul_bias():
    a = varied_rows(197, 64, generator_seed=3)
    b = varied_rows(64, 37, generator_seed=4)
    bias = torch.randn(37, generator=torch.Generator().manual_seed(5)) * 10
    spec = spec_of(8, PER_ROW)
    out = quantizer.quantized_matmul(a, b, spec, spec, bias)
    expected = ref_quantized_matmul(a, b, 8, 8, True, True, bias)
    scale = expected.abs().amax(dim=0)
    torch.testing.assert_close(out.double(), expected, rtol=3e-7, atol=float(scale.max()) * 3e-7)
    no_bias = ref_quantized_matmul(a, b, 8, 8, True, True)
    assert not torch.allclose(out.double(), no_bias)


def test_quantized_matmul_mixed_specs():
    # a per_tensor 4 bits, b per_row 8 bits: each operand gets its own spec.
    a = varied_rows(197, 64, generator_seed=6)
    b = varied_rows(64, 37, generator_seed=7)
    out = quantizer.quantized_matmul(a, b, spec_of(4, PER_TENSOR), spec_of(8, PER_ROW))
    expected = ref_quantized_matmul(a, b, 4, 8, False, True)
    assert_fake_quant_close(out, expected, a, b, 4, 8, False, True)


@pytest.mark.parametrize("batched", [False, True], ids=["2d", "4d"])
def test_quantized_matmul_bf16_in_bf16_out(batched):
    a, b = _operands(batched)
    a, b = a.bfloat16(), b.bfloat16()
    spec = spec_of(8, PER_ROW)
    bias = None if batched else torch.randn(37).bfloat16()
    out = quantizer.quantized_matmul(a, b, spec, spec, bias)
    assert out.dtype == torch.bfloat16
    expected = ref_quantized_matmul(a, b, 8, 8, True, True, bias)
    torch.testing.assert_close(out, expected.bfloat16(), rtol=1.6e-2, atol=1e-5)
    reference = a.double() @ b.double()
    if bias is not None:
        reference = reference + bias.double()
    # Measured 41.3 dB (2-D, with bias) and 43.3 dB (4-D); bf16 output rounding included.
    assert quantizer.sqnr_db(reference, out) >= 36.0


# --------------------------------------------------------------------------- gradient scaling


@pytest.mark.parametrize("granularity", [PER_TENSOR, PER_ROW])
@pytest.mark.parametrize("clipping", [Clipping.MINMAX, Clipping.IQR])
def test_scaling_gives_the_least_squares_scale(granularity, clipping):
    """With `scaling`, each slice's scale minimises ||x - s q|| for the integers chosen."""
    torch.manual_seed(0)
    x = torch.randn(37, 197) * torch.rand(37, 197).pow(4) * 3
    x[5, 11] = 40.0  # an outlier the IQR fence clips
    x[9] = 0.0
    plain = QuantSpec(granularity=granularity, clipping=clipping)
    scaled = QuantSpec(granularity=granularity, clipping=clipping, scaling=True)
    q_plain, _ = quantizer.quantize(x, plain, dim=-1)
    q, scale = quantizer.quantize(x, scaled, dim=-1)
    torch.testing.assert_close(q, q_plain, rtol=0, atol=0)  # same integers, new scales

    # Closed form in float64 per slice: s = <x, q> / <q, q> (1 for an all-zero slice).
    xs, qs = x.double(), q.double()
    if granularity is PER_ROW:
        num, den = (xs * qs).sum(1, keepdim=True), (qs * qs).sum(1, keepdim=True)
    else:
        num, den = (xs * qs).sum().reshape(1, 1), (qs * qs).sum().reshape(1, 1)
    expected = torch.where(den > 0, num / den, torch.ones_like(den))
    torch.testing.assert_close(scale.double(), expected, rtol=1e-5, atol=0)
    # ... and it is a minimum: nudging it either way increases the error.
    error = (xs - qs * scale.double()).pow(2).sum()
    for factor in (0.999, 1.001):
        assert (xs - qs * scale.double() * factor).pow(2).sum() > error
    # Least squares never does worse than the clip-derived scale.
    assert quantizer.sqnr_db(x, quantizer.dequantize(q, scale)) >= quantizer.sqnr_db(
        x, quantizer.dequantize(*quantizer.quantize(x, plain, dim=-1))
    )


# --------------------------------------------------------------------------- IQS codebook


def test_iqs_codebook_layout():
    torch.manual_seed(3)
    rows = torch.randn(4, 401) * torch.rand(4, 401).pow(5)
    rows[1] = rows[1].abs()  # a row with no negative outliers at all
    levels = quantizer.iqs_codebook(rows)
    assert levels.shape == (4, 256)
    assert bool((levels.diff(dim=1) >= 0).all())
    for row, level in zip(rows.double(), levels.double(), strict=True):
        q1, q3 = row.sort().values[[100, 300]]  # 25% and 75% of 401 values (kth 101, 301)
        central = level[(level >= q1) & (level <= q3)]
        positive = central[central > 0].sort(descending=True).values
        # Logarithmic inside the quartiles: each positive level half the one above it.
        if q3 > 0:
            assert positive[0].item() == pytest.approx(q3.item(), rel=1e-6)
            torch.testing.assert_close(positive[1:8] * 2, positive[:7])
        above, below = (row > q3).sum().item(), (row < q1).sum().item()
        n_above = round(240 * above / (above + below))
        assert int((level > q3).sum()) == n_above
        assert level.max().item() == pytest.approx(row.max().item(), rel=1e-6)
        if n_above < 240:
            assert level.min().item() == pytest.approx(row.min().item(), rel=1e-6)


@pytest.mark.parametrize("granularity", [PER_TENSOR, PER_ROW])
def test_iqs_rounds_to_the_nearest_level(granularity):
    torch.manual_seed(4)
    x = torch.randn(6, 97) * torch.rand(6, 97).pow(4)
    spec = QuantSpec(granularity=granularity, clipping=Clipping.IQS)
    simulated = quantizer.simulate(x, spec, dim=-1)
    rows = x.reshape(1, -1) if granularity is PER_TENSOR else x
    levels = quantizer.iqs_codebook(rows)
    # Brute force: the level closest to each value.
    nearest = levels.gather(1, (rows[:, :, None] - levels[:, None, :]).abs().argmin(dim=2))
    torch.testing.assert_close(simulated.reshape(rows.shape), nearest, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no integer form"):
        quantizer.quantize(x, spec, dim=-1)


def test_iqs_matmul_is_simulated_and_suits_heavy_tails():
    torch.manual_seed(5)
    a, b = torch.randn(197, 64), torch.randn(64, 37)
    gradient_like = a * torch.rand(197, 64).pow(6)  # most values near zero, a few large
    iqs = QuantSpec(clipping=Clipping.IQS)
    out = quantizer.quantized_matmul(gradient_like, b, iqs, QuantSpec())
    expected = quantizer.simulate(gradient_like, iqs, dim=-1)
    expected = expected @ quantizer.simulate(b, QuantSpec(), dim=-2)
    torch.testing.assert_close(out, expected)
    exact = gradient_like.double() @ b.double()
    uniform = quantizer.quantized_matmul(gradient_like, b, QuantSpec(), QuantSpec())
    # Measured 40.6 dB (IQS) against 39.2 dB (uniform minmax) on this heavy-tailed operand;
    # on a Gaussian operand IQS's coarse factor-2 central levels give only 25.6 dB.
    assert quantizer.sqnr_db(exact, out) > 36
    assert quantizer.sqnr_db(exact, out) > quantizer.sqnr_db(exact, uniform)


# --------------------------------------------------------------------------- LSQ
#
# References written here in float64. The gradient reference is the paper's STE written with
# detach tricks (value of one expression, gradient of another), independently of the
# autograd.Function under test: clipping by explicit masks, so the bounds count as clipped
# (LSQ's open inside), whatever torch.clamp's gradient at its bounds.


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
