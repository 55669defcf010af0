"""gradq: train timm Vision Transformers with INT8 weights, activations and gradients.

model = torch.compile(model, backend="gradq", options={"attention": "int8"})
"""

from gradq_fx import (
    ops,  # noqa: F401  (registers torch.ops.gradq.*)
    qat,
)
from gradq_fx.backend import compile, compiled_reports
from gradq_fx.config import (
    Attention,
    Clipping,
    GradQConfig,
    Granularity,
    QuantSpec,
    Role,
    Rounding,
)
from gradq_fx.stats import AdaptiveLR, param_groups
from gradq_fx.stats import stats as layer_stats

__all__ = [
    "AdaptiveLR",
    "Attention",
    "Clipping",
    "GradQConfig",
    "Granularity",
    "QuantSpec",
    "Role",
    "Rounding",
    "compile",
    "compiled_reports",
    "layer_stats",
    "param_groups",
    "qat",
]
