"""gradq's lowerings: one object per way of computing the quantized GEMMs (`base.GemmLowering`).

- `reference`: the numerics in plain torch, compiled by Inductor (the CPU's default);
- `inductor_template`: the same graph with Inductor's Triton GEMM template forced (CUDA);
- `triton`: gradq's Triton kernels, quantize and GEMM each one launch (CUDA's default);
- `fused`: Inductor fuses the quantize into the operands' producers; gradq's GEMM.

Adding a lowering means adding its module here and its member to `config.Lowering`.
"""

from __future__ import annotations

import torch

from gradq_fx import kernels
from gradq_fx.config import Lowering
from gradq_fx.lowerings.base import GemmLowering
from gradq_fx.lowerings.fused import FUSED
from gradq_fx.lowerings.inductor_template import INDUCTOR_TEMPLATE
from gradq_fx.lowerings.reference import REFERENCE
from gradq_fx.lowerings.triton import TRITON

_LOWERINGS: dict[Lowering, GemmLowering] = {
    lowering.kind: lowering for lowering in (REFERENCE, INDUCTOR_TEMPLATE, TRITON, FUSED)
}


def resolve(kind: Lowering, device: torch.device) -> GemmLowering:
    """The lowering `kind` names for GEMMs on `device`: `auto` is triton on CUDA (where Triton
    imports), else the reference. Raises a ValueError for a lowering the device lacks."""
    if kind is Lowering.AUTO:
        on_gpu = device.type == "cuda" and kernels.triton_installed()
        return TRITON if on_gpu else REFERENCE
    lowering = _LOWERINGS[kind]
    lowering.check_device(device)
    return lowering


def get(kind: Lowering) -> GemmLowering:
    """The lowering object of a resolved kind (never `auto`)."""
    return _LOWERINGS[kind]


__all__ = ["GemmLowering", "get", "resolve"]
