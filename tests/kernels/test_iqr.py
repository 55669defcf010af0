"""gradq_fx.kernels.iqr: the fused `iqr` clip kernel against gradq_fx.quantizer.clip_value.

Tests marked `interpret` run the Triton kernel in Triton's CPU interpreter (see conftest.py);
the others check the launcher's torch path and its validation; `gpu` tests run it on CUDA.
The kernel's log2, exp2 and sums are the device's, not torch's (kernels/iqr.py): its clip is
the reference's candidate up to float rounding, or, where two fences tie within float noise,
a fence whose float64 cosine is as good.
"""

from __future__ import annotations

import pytest
import torch

from gradq_fx import quantizer
from gradq_fx.config import Clipping, QuantSpec
from gradq_fx.kernels import triton_interpreting
from gradq_fx.kernels.iqr import iqr_clip_rows, iqr_clip_rows_reference
from tests.kernels.conftest import interpret, needs_cuda
from tests.kernels.test_quantize import make_rows

# Rows x columns: primes, a ViT token count, single row / column, rows of several tiles of the
# interpreter's 32 columns with a ragged last one, and long rows (a wgrad operand's tokens).
SHAPES = [(1, 1), (5, 4), (13, 37), (197, 61), (16, 100), (3, 1031)]


def float64_cosine(x: torch.Tensor, clip: torch.Tensor, bits: int) -> torch.Tensor:
    """Per row, the cosine of x with its nearest-rounded quantization at `clip`, in float64."""
    qmax = 2 ** (bits - 1) - 1
    x, clip = x.double(), clip.double()[:, None]
    scale = torch.where(clip > 0, clip / qmax, torch.ones_like(clip))
    restored = (x / scale).round().clamp(-qmax, qmax) * scale
    norms = (x.norm(dim=1) * restored.norm(dim=1)).clamp_min(1e-300)
    return (x * restored).sum(dim=1) / norms


def assert_same_clip(clip: torch.Tensor, x: torch.Tensor, bits: int) -> None:
    want = quantizer.clip_value(x.float(), QuantSpec(bits=bits, clipping=Clipping.IQR))
    assert clip.dtype == torch.float32 and clip.shape == want.shape
    # The same candidate, up to the device's log2 / exp2 (GPUs: approximate, a few ulp on a
    # quartile, which a fence Q3 + 64 IQR can grow to ~1e-5): distinct candidates are at least
    # a bin (2^(1/16): 4%) or a power of two of the IQR apart, so 1e-4 tells them apart.
    close = (clip - want).abs() <= 1e-4 * want
    # Elsewhere a near tie: the kernel's pick scores as well as the reference's, in float64.
    cos_kernel, cos_reference = float64_cosine(x, clip, bits), float64_cosine(x, want, bits)
    tied = cos_kernel >= cos_reference - 1e-5
    bad = (~(close | tied)).nonzero().flatten().tolist()
    assert not bad, f"rows {bad[:5]}: clip {clip[bad[:5]].tolist()}, want {want[bad[:5]].tolist()}"
    assert close.float().mean() >= 0.95  # ties are rare: most rows agree to a few ulp
    # A row of zeros keeps clip 0 (scale 1, zero codes), exactly.
    zero_rows = (x == 0).all(dim=1)
    assert torch.equal(clip[zero_rows], torch.zeros_like(clip[zero_rows]))


@interpret
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_clip_value(shape, bits):
    x = make_rows(*shape, torch.float32, seed=bits)
    assert_same_clip(iqr_clip_rows(x, bits), x, bits)


@interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_reads_half_precision_and_transposed_rows(dtype):
    x = make_rows(61, 197, dtype, seed=3)
    assert_same_clip(iqr_clip_rows(x, 8), x, 8)
    transposed = x.t().contiguous().t()  # column-major rows: the wgrad operand's layout
    assert torch.equal(iqr_clip_rows(transposed, 8), iqr_clip_rows(x, 8))


@interpret
def test_kernel_on_mostly_zero_and_gradient_like_rows():
    # dY of a ViT's last block is nonzero only in the CLS token's row: a row of which over
    # three quarters is zero has Q3 = 0 and every fence falls back to amax.
    gen = torch.Generator().manual_seed(5)
    x = torch.zeros(4, 197)
    x[0, 0] = 3.0
    x[1, :40] = torch.randn(40, generator=gen)
    x[2] = torch.randn(197, generator=gen) * torch.logspace(-6, 0, 197)  # heavy tail
    x[3] = torch.distributions.Laplace(0.0, 1.0).sample((197,))
    clip = iqr_clip_rows(x, 8)
    assert_same_clip(clip, x, 8)
    assert clip[0] == 3.0 and clip[1] == x[1].abs().max()


def test_cpu_path_is_the_reference():
    x = make_rows(197, 61, torch.float32)
    want = quantizer.clip_value(x, QuantSpec(clipping=Clipping.IQR))
    if not triton_interpreting():
        assert torch.equal(iqr_clip_rows(x, 8), want)
    assert torch.equal(iqr_clip_rows_reference(x.bfloat16(), 8), quantizer.clip_value(
        x.bfloat16().float(), QuantSpec(clipping=Clipping.IQR)))  # fmt: skip


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(3), 8), "x must be a 2-D"),
        ((torch.zeros(3, 4, dtype=torch.int8), 8), "x must be a 2-D float"),
        ((torch.zeros(3, 0), 8), "at least one column"),
        ((torch.zeros(3, 4), 9), "bits must be an integer from 2 to 8"),
        ((torch.zeros(3, 4), True), "bits must be an integer"),
    ],
)
def test_launcher_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        iqr_clip_rows(*args)


def test_fake_gives_one_float32_clip_per_row():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        clip = iqr_clip_rows(torch.empty(197, 61, dtype=torch.bfloat16), 8)
    assert clip.shape == (197,) and clip.dtype == torch.float32


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [*SHAPES, (25216 // 16, 768), (768, 25216 // 16)], ids=str)
def test_kernel_on_cuda(shape):
    x = make_rows(*shape, torch.float32, seed=7)
    assert_same_clip(iqr_clip_rows(x.cuda(), 8).cpu(), x, 8)


@interpret
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_kernel_clip_of_a_row_with_nan_or_inf_is_nan(value):
    x = make_rows(13, 70, torch.float32, seed=11)
    x[2, 0] = value  # the outlier row
    x[7, 69] = value  # in the last, ragged tile
    bad = torch.zeros(13, dtype=torch.bool)
    bad[[2, 7]] = True
    clip = iqr_clip_rows(x, 8)
    reference = quantizer.clip_value(x, QuantSpec(clipping=Clipping.IQR))
    assert torch.isnan(clip[bad]).all()
    assert not torch.isfinite(reference[bad]).any()  # the reference's: NaN or Inf, not finite
    assert_same_clip(clip[~bad], x[~bad], 8)
