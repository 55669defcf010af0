"""gradq: train timm Vision Transformers with INT8 weights, activations and gradients.

model = torch.compile(model, backend="gradq", options={"attention": "int8"})
"""

from gradq_fx import ops  # noqa: F401  (registers torch.ops.gradq.*)
from gradq_fx.backend import compile
from gradq_fx.config import (
    Attention,
    Clipping,
    GradQConfig,
    Granularity,
    QuantSpec,
    Role,
    Rounding,
)

__all__ = [
    "Attention",
    "Clipping",
    "GradQConfig",
    "Granularity",
    "QuantSpec",
    "Role",
    "Rounding",
    "compile",
]
