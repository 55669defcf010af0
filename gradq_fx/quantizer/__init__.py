"""The one home of gradq's quantizer math, in pure torch, split by subject:

- `core`: one operand's quantizer. Rows views (`as_rows`, `slice_rows` and their inverses),
  clipping (`clip_value`: minmax, iqr from `estimate_quartiles`), rounding and codes, scales
  (`scale_of`, `least_squares_scale`), `quantize` / `dequantize`, `quantization_stats`, the
  IQS codebook and `simulate`, `is_fake_quantized`, `sqnr_db`; and how non-finite values
  behave.
- `gemm`: `quantized_matmul`, the quantized GEMM the passes lower (its formula).
- `conv`: the three GEMMs of a dense convolution (forward, input and weight gradients), with
  the scale groupings a convolution allows (`conv2d_scale_groups`).
- `lsq`: LSQ fake quantization for low-bit QAT (forward, straight-through gradients, gradient
  scales, step-size initialisation).

The lowerings (gradq_fx/lowerings) compute these numbers, and gradq's kernels (kernels/)
reproduce them bit for bit where their docstrings say so. Every function traces under
torch.compile (no data-dependent shapes, no host sync) except LSQ's eager step-size
initialisation. docs/method.md explains the choices. Every public name of the four modules is
importable from here: `from gradq_fx import quantizer; quantizer.quantize(...)`.
"""

from gradq_fx.quantizer.conv import (
    conv2d_scale_groups,
    quantize_slices,
    quantized_conv2d,
    quantized_conv2d_input_grad,
    quantized_conv2d_weight_grad,
    simulate_slices,
)
from gradq_fx.quantizer.core import (
    IQR_BINS_PER_OCTAVE,
    IQR_COSINE_TIE,
    IQR_FENCE_COUNT,
    IQR_NUM_BINS,
    IQR_OCTAVES,
    as_rows,
    clip_value,
    codes,
    dequantize,
    estimate_quartiles,
    from_rows,
    from_slice_rows,
    iqs_codebook,
    iqs_simulate,
    is_fake_quantized,
    keep_nonfinite,
    least_squares_scale,
    quantization_stats,
    quantize,
    round_values,
    row_values_like,
    scale_of,
    simulate,
    slice_rows,
    sqnr_db,
)
from gradq_fx.quantizer.gemm import quantized_matmul
from gradq_fx.quantizer.lsq import (
    LSQ_INIT_MAX_ITERATIONS,
    LSQ_INIT_STARTS,
    LSQ_MIN_STEP,
    LSQFakeQuantize,
    lsq_activation_grad_scale,
    lsq_arguments,
    lsq_backward,
    lsq_bounds,
    lsq_clipped,
    lsq_codes,
    lsq_fake_quantize,
    lsq_forward,
    lsq_init_activation_scale,
    lsq_init_weight_scale,
    lsq_weight_grad_scale,
)

__all__ = [
    "IQR_BINS_PER_OCTAVE",
    "IQR_COSINE_TIE",
    "IQR_FENCE_COUNT",
    "IQR_NUM_BINS",
    "IQR_OCTAVES",
    "LSQ_INIT_MAX_ITERATIONS",
    "LSQ_INIT_STARTS",
    "LSQ_MIN_STEP",
    "LSQFakeQuantize",
    "as_rows",
    "clip_value",
    "codes",
    "conv2d_scale_groups",
    "dequantize",
    "estimate_quartiles",
    "from_rows",
    "from_slice_rows",
    "iqs_codebook",
    "iqs_simulate",
    "is_fake_quantized",
    "keep_nonfinite",
    "least_squares_scale",
    "lsq_activation_grad_scale",
    "lsq_arguments",
    "lsq_backward",
    "lsq_bounds",
    "lsq_clipped",
    "lsq_codes",
    "lsq_fake_quantize",
    "lsq_forward",
    "lsq_init_activation_scale",
    "lsq_init_weight_scale",
    "lsq_weight_grad_scale",
    "quantization_stats",
    "quantize",
    "quantize_slices",
    "quantized_conv2d",
    "quantized_conv2d_input_grad",
    "quantized_conv2d_weight_grad",
    "quantized_matmul",
    "round_values",
    "row_values_like",
    "scale_of",
    "simulate",
    "simulate_slices",
    "slice_rows",
    "sqnr_db",
]
