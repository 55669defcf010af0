"""A quantized GEMM out = a @ b, a [..., M, K], b [..., K, N] (`quantized_matmul`):

  scale_a = clip_a / qmax      one per row of a (per_row) or one per tensor, reduced over K
  scale_b = clip_b / qmax      one per column of b (per_row) or one per tensor, reduced over K
  q_a     = clamp(round(a / scale_a), -qmax, qmax)  as int8     (likewise q_b)
  scale_a = <a, q_a> / <q_a, q_a>  per slice, only with `scaling` (likewise scale_b)
  acc     = q_a @ q_b          exact, in int32
  out     = (float32(acc) * scale_a * scale_b + bias)  cast to a's dtype

A slice that is all zeros gets scale 1 (and quantizes to zeros); one holding a NaN or an Inf
makes the outputs it feeds NaN (`core`'s docstring). The lowerings compute this GEMM; gradq's
kernels (kernels/quantize.py, kernels/gemm.py) reproduce it, their docstrings say how exactly.
"""

from __future__ import annotations

import torch

from gradq_fx.config import QuantSpec
from gradq_fx.kernels.int_mm import int8_gemm
from gradq_fx.quantizer.core import is_fake_quantized, quantize, simulate


def _fake_quantized(x: torch.Tensor, spec: QuantSpec | None, dim: int) -> torch.Tensor:
    """x as a fake-quantized GEMM operand (float32): as is when spec is None (quantized
    upstream, by an LSQ quantizer), else `simulate`d with spec."""
    return x.float() if spec is None else simulate(x, spec, dim)


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
