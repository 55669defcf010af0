"""The lowering protocol: what a lowering says about each gradq op it computes.

A lowering is one object (`reference`, `inductor_template`, `triton`, `fused`, each in its own
module of this package). The lowering pass (`gradq_fx.passes.lower`) asks the object that a
GEMM's plan (`gradq_fx.plan`) names to compute that GEMM, and the backend asks it for the
Inductor config it needs. Every method is plain, traceable torch (or gradq's registered
kernel ops): the pass traces it into the joint graph in place of the gradq op.

Operand specs arrive decoded (`QuantSpec`); every GEMM a lowering is asked for runs in INT8
(both operands at 8 bits, no IQS): fake quantization and float GEMMs are the reference's
business whatever the lowering (`reference.run_mm`, `reference.float_mm`).
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from gradq_fx import quantizer
from gradq_fx.config import Lowering, QuantSpec, Role


class GemmLowering(abc.ABC):
    """One way to compute gradq's INT8 GEMMs, convolutions and gradient statistics."""

    kind: Lowering
    # Whether the fallback rule times this lowering's INT8 path against float (on CUDA):
    # the kernel lowerings, whose speed depends on the shape.
    measured: bool = False

    def check_device(self, device: torch.device) -> None:  # noqa: B027 (most run anywhere)
        """Raise a ValueError naming the option when this lowering cannot run on `device`."""

    @abc.abstractmethod
    def quantize_rows(
        self, rows: torch.Tensor, spec: QuantSpec
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize each row of a 2-D operand -> (int8 codes [R, C], float32 scales [R])."""

    @abc.abstractmethod
    def mm(
        self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, a_spec: QuantSpec,
        b_spec: QuantSpec,
    ) -> torch.Tensor:  # fmt: skip
        """a [..., M, K] @ b [..., K, N] (+ bias [N]), both operands quantized along K; the
        result in a's dtype."""

    @abc.abstractmethod
    def conv2d(
        self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, stride: tuple,
        padding: tuple, size: tuple, a_spec: QuantSpec, b_spec: QuantSpec, role: Role,
    ) -> torch.Tensor:  # fmt: skip
        """One GEMM of a dense convolution (`gradq_fx.ops.conv2d_op` says what a, b and size
        are for each role), both operands quantized; the result in a's dtype."""

    @abc.abstractmethod
    def stats(self, x: torch.Tensor, spec: QuantSpec, dim: int) -> torch.Tensor:
        """A wgrad gradient's quantization statistics (`quantizer.quantization_stats`)."""

    def inductor_config(self) -> dict[str, Any]:
        """Inductor config this lowering needs, beyond gradq's joint-graph pass."""
        return {}

    def quantize_slices(
        self, x: torch.Tensor, spec: QuantSpec, keep: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`quantizer.quantize_slices` through `quantize_rows`: one scale per index of
        dimension `keep` (rows [x.shape[keep], everything else]) -> (int8 x-shaped, [rows])."""
        q, scale = self.quantize_rows(quantizer.slice_rows(x, keep), spec)
        return quantizer.from_slice_rows(q, x, keep), scale
