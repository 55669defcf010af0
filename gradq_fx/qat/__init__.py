"""Low-bit quantization-aware training: the Quantization Variation remedies (method.md).

- `LSQQuantizer`, `QKVQuantizers`, `split_qkv`: learnable step sizes, q/k/v kept apart;
- `bin_regularizer`, `obr_lambda`, `OscillationTracker`: the oscillation-aware bin regularizer;
- `TeacherTable` (with `gradq_fx.losses.kd_loss`): distillation from precomputed probabilities.
The numerics are in `gradq_fx.quantizer` (the LSQ section).
"""

from gradq_fx.qat.distill import TeacherTable
from gradq_fx.qat.lsq import LSQQuantizer, QKVQuantizers, split_qkv
from gradq_fx.qat.regularizer import OscillationTracker, bin_regularizer, obr_lambda

__all__ = [
    "LSQQuantizer",
    "OscillationTracker",
    "QKVQuantizers",
    "TeacherTable",
    "bin_regularizer",
    "obr_lambda",
    "split_qkv",
]
