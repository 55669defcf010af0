"""The fused lowering: Inductor's own kernels quantize each operand, gradq's Triton GEMM
dequantizes in its epilogue.

The quantize is the reference's plain torch (abs, amax, divide, round, clamp, cast), which
Inductor fuses into the kernel that produces the operand (a LayerNorm, a GELU, a residual
add) and may recompute in the backward instead of saving int8 codes. Per-row iqr clips still
come from `kernels/iqr.py`. Everything else is the triton lowering's. On a CPU tensor the
GEMM runs its reference: the reference's bits.
"""

from __future__ import annotations

from gradq_fx.config import Lowering
from gradq_fx.lowerings.reference import REFERENCE
from gradq_fx.lowerings.triton import Triton, kernel_clip


class Fused(Triton):
    kind = Lowering.FUSED

    def quantize_rows(self, rows, spec):
        return REFERENCE.quantize_rows(rows, spec, clip=kernel_clip(rows, spec))


FUSED = Fused()
