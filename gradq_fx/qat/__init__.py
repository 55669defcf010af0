"""Low-bit quantization-aware training: the Quantization Variation remedies (docs/method.md).

- `attach_lsq`, `initialise_lsq`: LSQ quantizers on a model's Linears (`LSQLinear`), which
  gradq's rewrite recognises (the forward GEMM is not quantized twice);
- `LSQQuantizer`, `QKVQuantizers`, `split_qkv`: learnable step sizes, q/k/v kept apart;
- `bin_regularizer`, `obr_lambda`, `OscillationTracker`: the oscillation-aware bin regularizer;
- `TeacherTable` (with `gradq_fx.losses.kd_loss`): distillation from precomputed probabilities.
The numerics are in `gradq_fx.quantizer` (the LSQ section).
"""

from gradq_fx.qat.distill import TeacherTable
from gradq_fx.qat.linear import (
    LSQLinear,
    attach_lsq,
    initialise_lsq,
    lsq_bits,
    lsq_linears,
    quantized_weights,
)
from gradq_fx.qat.lsq import LSQQuantizer, QKVQuantizers, split_qkv
from gradq_fx.qat.regularizer import OscillationTracker, bin_regularizer, obr_lambda

__all__ = [
    "LSQLinear",
    "LSQQuantizer",
    "OscillationTracker",
    "QKVQuantizers",
    "TeacherTable",
    "attach_lsq",
    "bin_regularizer",
    "initialise_lsq",
    "lsq_bits",
    "lsq_linears",
    "obr_lambda",
    "quantized_weights",
    "split_qkv",
]
