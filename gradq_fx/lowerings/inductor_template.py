"""The inductor_template lowering: the reference's graph, with Inductor's own Triton GEMM
template forced so that the dequantize can fuse into the integer GEMM's epilogue (cuBLAS
would leave it a separate pass over the int32 result). CUDA only."""

from __future__ import annotations

from gradq_fx.config import Lowering
from gradq_fx.lowerings.reference import Reference


class InductorTemplate(Reference):
    kind = Lowering.INDUCTOR_TEMPLATE

    def check_device(self, device):
        if device.type != "cuda":
            raise ValueError(
                f"option 'lowering': {self.kind.value!r} forces Inductor's Triton GEMM template, "
                f"which needs a CUDA device; the model runs on {device.type} (use 'auto')"
            )

    def inductor_config(self):
        return {"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON"}


INDUCTOR_TEMPLATE = InductorTemplate()
