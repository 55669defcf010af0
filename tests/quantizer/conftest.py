"""What the tests of gradq_fx.quantizer share: references written here, in float64 / int64.

Reference quantizer (gradq_fx/quantizer/core.py's docstring): one float32 scale per slice,
scale = absmax / qmax (1 for an all-zero slice), q = clamp(round_half_even(x / scale)).
The reference divides in float64 and rounds once to float32: for float32 operands that equals
float32 division exactly (53 >= 2 * 24 + 2, so the double rounding is innocuous).
"""

from __future__ import annotations

import torch

from gradq_fx.config import Clipping, Granularity, QuantSpec, Rounding

PER_TENSOR, PER_ROW = Granularity.PER_TENSOR, Granularity.PER_ROW
# The clippings with an integer form (IQS, the non-uniform codebook, is tested on its own).
UNIFORM_CLIPPINGS = (Clipping.MINMAX, Clipping.IQR)


def spec_of(bits=8, granularity=PER_ROW, rounding=Rounding.NEAREST, clipping=Clipping.MINMAX):
    return QuantSpec(bits, granularity, rounding, clipping)


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


def varied_rows(*shape, generator_seed=0):
    """Gaussian values with per-slice magnitudes spread over 6 decades (both last two dims)."""
    torch.manual_seed(generator_seed)
    x = torch.randn(*shape)
    x = x * 10 ** torch.empty(*shape[:-1], 1).uniform_(-3, 3)
    if x.dim() >= 2:
        x = x * 10 ** torch.empty(*shape[:-2], 1, shape[-1]).uniform_(-1, 1)
    return x
