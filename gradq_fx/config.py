"""What gradq quantizes and how: frozen dataclasses, built from `torch.compile` options.

Notation (docs/method.md): a linear layer Y = X W^T has three GEMMs,
forward Y = X W^T (contracts K), dgrad dX = dY W (contracts N), wgrad dW = dY^T X (contracts M).

A scale can be factored out of an integer GEMM only if it is constant along the contracted
dimension. gradq therefore quantizes each operand *for each GEMM it feeds*, along that GEMM's
kept (non-contracted) dimension: `per_row` means one scale per row of the left operand and one
per column of the right operand. X gets per-token scales in forward and per-input-channel
scales in wgrad; W per-output-channel scales in forward and per-input-channel scales in dgrad.
Every granularity is thus valid for every contraction, and the defaults can be the accurate
ones: `per_row` everywhere.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any


class Granularity(enum.Enum):
    PER_TENSOR = "per_tensor"
    PER_ROW = "per_row"


class Rounding(enum.Enum):
    NEAREST = "nearest"
    STOCHASTIC = "stochastic"


class Clipping(enum.Enum):
    """How the quantization grid is chosen: a clipping value for the uniform grid, or IQS."""

    MINMAX = "minmax"  # absmax of the slice
    IQR = "iqr"  # fence Q3 + k*IQR of |x|, k picked for the best cosine (docs/method.md)
    # GradQ-ViT's non-uniform 256-level codebook (docs/method.md). No INT8 GEMM can take
    # it: GEMMs with an IQS operand are simulated (decoded operands, float GEMM).
    IQS = "iqs"


class Attention(enum.Enum):
    FLOAT = "float"  # timm's attention (fused SDPA or explicit matmuls) stays in float
    INT8 = "int8"  # QK^T and PV quantized too; softmax stays in float


class Lowering(enum.Enum):
    """How the INT8 GEMMs of the joint graph are computed: each member but AUTO names one
    lowering object of `gradq_fx.lowerings`, whose module says what it runs."""

    AUTO = "auto"  # triton on CUDA (when triton imports), reference elsewhere
    REFERENCE = "reference"  # plain torch numerics, compiled by Inductor
    INDUCTOR_TEMPLATE = "inductor_template"  # the same, Inductor's Triton GEMM template (CUDA)
    TRITON = "triton"  # gradq's Triton kernels: a quantize launch per operand, one GEMM launch
    FUSED = "fused"  # Inductor fuses each operand's quantize into its producer; gradq's GEMM


class Fallback(enum.Enum):
    """Which quantized GEMMs run as float GEMMs instead (`gradq_fx.fallback`)."""

    # On CUDA, under the triton and fused lowerings: each GEMM whose INT8 path (quantizing
    # both operands, the INT8 GEMM and its dequantize) measured slower than the float GEMM
    # it replaces, at that GEMM's shapes, on this device.
    SLOWER = "slower"
    NEVER = "never"  # every quantized GEMM runs in INT8, whatever its speed


class Role(enum.Enum):
    FORWARD = "forward"
    DGRAD = "dgrad"  # gradient of an activation (for attention: of either operand)
    WGRAD = "wgrad"  # gradient of a weight


class Operand(enum.Enum):
    """What a GEMM operand is; gradq's GEMM ops name their two operands by these letters."""

    WEIGHT = "W"
    ACTIVATION = "A"
    GRADIENT = "G"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one GEMM operand is quantized: symmetric, integers in [-qmax, qmax].

    qmax = 2^(bits-1) - 1 (127 at 8 bits); -128 is never used, so negation is exact.
    scaling: after rounding, replace each slice's scale by the least-squares one for the chosen
    integers, <x, q> / <q, q> (GradQ-ViT's gradient scaling, docs/method.md). It aligns the
    dequantized tensor with x and folds into the GEMM's dequantize scale at no cost.
    """

    bits: int = 8
    granularity: Granularity = Granularity.PER_ROW
    rounding: Rounding = Rounding.NEAREST
    clipping: Clipping = Clipping.MINMAX
    scaling: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        for name, kind in (
            ("granularity", Granularity),
            ("rounding", Rounding),
            ("clipping", Clipping),
        ):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        if not isinstance(self.scaling, bool):
            raise ValueError(f"scaling must be True or False, got {self.scaling!r}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def encode(self) -> str:
        """A string that travels as a custom-op argument: '8:per_row:nearest:minmax:unscaled'."""
        scaling = "scaled" if self.scaling else "unscaled"
        fields = (self.granularity.value, self.rounding.value, self.clipping.value, scaling)
        return ":".join((str(self.bits), *fields))

    @classmethod
    def decode(cls, text: str) -> QuantSpec:
        bits, granularity, rounding, clipping, scaling = text.split(":")
        return cls(
            int(bits),
            Granularity(granularity),
            Rounding(rounding),
            Clipping(clipping),
            scaling == "scaled",
        )


# A GEMM operand that an LSQ quantizer (`gradq_fx.qat`) fake-quantized upstream travels as
# "lsq:<bits>" where a QuantSpec.encode() string would: the GEMM uses it as is.
LSQ_OPERAND_PREFIX = "lsq:"


def lsq_operand(bits: int) -> str:
    """The operand string of an input already LSQ-fake-quantized at `bits`: 'lsq:4'."""
    return f"{LSQ_OPERAND_PREFIX}{bits}"


def decode_operand(text: str) -> QuantSpec | None:
    """A GEMM operand string as its QuantSpec, or None for an LSQ operand (used as is)."""
    if text.startswith(LSQ_OPERAND_PREFIX):
        return None
    return QuantSpec.decode(text)


def operand_bits(text: str) -> int:
    """The bit width of a GEMM operand string (QuantSpec or LSQ)."""
    if text.startswith(LSQ_OPERAND_PREFIX):
        return int(text.removeprefix(LSQ_OPERAND_PREFIX))
    return QuantSpec.decode(text).bits


@dataclasses.dataclass(frozen=True)
class GradQConfig:
    """Everything gradq's rewrite needs to know. All fields have defaults that just work.

    Defaults, and why:
    - weight, activation: 8 bits, `per_row`, round to nearest, absmax clipping. Per-row scales
      follow the GEMM's kept dimension (module docstring), so they are valid in all three GEMMs
      and track per-token and per-channel ranges, which differ by orders of magnitude in ViTs.
    - gradient: 8 bits, `per_row`, round to nearest (GradQ-ViT uses deterministic rounding;
      stochastic is offered as the known baseline), `iqr` clipping: ViT gradients are heavy
      tailed and an absmax scale spends most levels on a few outliers; least-squares
      `scaling`, which restores the magnitude that clipping takes away.
    - all three GEMMs quantized; attention kept in float (timm's fused SDPA unchanged);
      every Linear included (`include=("*",)`, `exclude=()`).
    - `convolutions`: 2-D convolutions of groups 1 and dilation 1 are quantized. Those that
      are GEMMs (1x1 kernels, and patchify kernels whose stride equals their size, without
      padding) like Linears; dense k x k ones as implicit GEMMs, where `per_row` scales X
      (forward) and dY (dgrad) per image, since a per-pixel scale would vary along the
      kernel window (`quantizer`'s convolution section). Depthwise, grouped and dilated
      convolutions stay float, and the report says why (`passes.annotate`).
    - `stats` off: each quantized Linear can record how well its wgrad gradient survives
      quantization (cosine, relative error; `gradq_fx.stats`), which the adaptive learning
      rate reads. It costs one more quantization of dY per layer and step (its per-row iqr
      clip from `kernels/iqr.py` under the triton and fused lowerings: `lowerings.triton`),
      so only those who ask for it (GradQ-ViT's adaptive learning rate) pay for it.
    - `lowering` auto: gradq's Triton kernels on CUDA. On an H100 a hand-written Triton INT8
      GEMM with the scales in its epilogue was reported at 1.10x to 1.26x of bf16 where
      Inductor's own lowering of the same numerics ran at 0.34x to 0.50x (a measurement made
      before this repository's kernels; docs/results.md lists such figures).
    - `fallback` slower: the same measurement found a shape (12608 x 768 x 768) where the INT8
      GEMM ran at 0.60x of bf16; INT8 is only worth its error where it is faster, so each
      shape where it measures slower on the device runs as the float GEMM, and the report
      says so.
    - `compile_once` on: a model's repeated blocks (a ViT's `blocks.0` ... `blocks.11`) are
      the same code on different weights, so the backend compiles each distinct block once
      and runs it for every instance (`gradq_fx.regions`); the same numbers, a fraction of
      the compile time. Off: the whole graph is compiled as one.
    """

    weight: QuantSpec = QuantSpec()
    activation: QuantSpec = QuantSpec()
    gradient: QuantSpec = QuantSpec(clipping=Clipping.IQR, scaling=True)
    forward: bool = True
    dgrad: bool = True
    wgrad: bool = True
    attention: Attention = Attention.FLOAT
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    stats: bool = False
    lowering: Lowering = Lowering.AUTO
    convolutions: bool = True
    fallback: Fallback = Fallback.SLOWER
    compile_once: bool = True

    def __post_init__(self):
        for name in ("weight", "activation", "gradient"):
            if not isinstance(getattr(self, name), QuantSpec):
                raise ValueError(f"{name} must be a QuantSpec, got {getattr(self, name)!r}")
        for name in ("forward", "dgrad", "wgrad", "stats", "convolutions", "compile_once"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.attention, Attention):
            raise ValueError(f"attention must be an Attention, got {self.attention!r}")
        if not isinstance(self.lowering, Lowering):
            raise ValueError(f"lowering must be a Lowering, got {self.lowering!r}")
        if not isinstance(self.fallback, Fallback):
            raise ValueError(f"fallback must be a Fallback, got {self.fallback!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"{name} must be a tuple of glob strings, got {value!r}")

    @classmethod
    def coerce(cls, options: GradQConfig | Mapping[str, Any] | None) -> GradQConfig:
        """A GradQConfig as is, or one built from an options dict (None: the defaults)."""
        if isinstance(options, GradQConfig):
            return options
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(
                f"options must be a dict or a GradQConfig, got {type(options).__name__}"
            )
        return cls.from_options(options)

    def quantizes(self, role: Role) -> bool:
        return {Role.FORWARD: self.forward, Role.DGRAD: self.dgrad, Role.WGRAD: self.wgrad}[role]

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> GradQConfig:
        """Build a config from `torch.compile(..., options={...})`; see `OPTIONS` for the keys."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown gradq option(s) {unknown}; valid options: {', '.join(sorted(OPTIONS))}"
            )
        config = cls()
        for key, value in options.items():
            config = OPTIONS[key](config, key, value)
        return config

    def to_options(self) -> dict[str, Any]:
        """The inverse of `from_options` (a plain, JSON-serialisable dict)."""
        out: dict[str, Any] = {}
        for operand in ("weight", "activation", "gradient"):
            spec = getattr(self, operand)
            out[f"{operand}_bits"] = spec.bits
            out[f"{operand}_granularity"] = spec.granularity.value
            out[f"{operand}_rounding"] = spec.rounding.value
            out[f"{operand}_clipping"] = spec.clipping.value
            out[f"{operand}_scaling"] = spec.scaling
        out.update(forward=self.forward, dgrad=self.dgrad, wgrad=self.wgrad)
        out.update(attention=self.attention.value, include=list(self.include))
        out["exclude"] = list(self.exclude)
        out["stats"] = self.stats
        out["lowering"] = self.lowering.value
        out["convolutions"] = self.convolutions
        out["fallback"] = self.fallback.value
        out["compile_once"] = self.compile_once
        return out


def _choice(kind: type[enum.Enum], key: str, value: Any) -> enum.Enum:
    if isinstance(value, kind):
        return value
    valid = [member.value for member in kind]
    if value not in valid:
        raise ValueError(f"option {key!r} must be one of {valid}, got {value!r}")
    return kind(value)


def _bits(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise ValueError(f"option {key!r} must be an integer from 2 to 8, got {value!r}")
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"option {key!r} must be True or False, got {value!r}")
    return value


def _set_spec_field(operand: str, field: str, kind):
    """kind: an Enum class, or a validator (key, value) -> value."""

    def apply(config: GradQConfig, key: str, value: Any) -> GradQConfig:
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            value = _choice(kind, key, value)
        else:
            value = kind(key, value)
        spec = dataclasses.replace(getattr(config, operand), **{field: value})
        return dataclasses.replace(config, **{operand: spec})

    return apply


def _set_bool(config: GradQConfig, key: str, value: Any) -> GradQConfig:
    return dataclasses.replace(config, **{key: _flag(key, value)})


def _set_globs(config: GradQConfig, key: str, value: Any) -> GradQConfig:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"option {key!r} must be a glob string or a list of them, got {value!r}")
    return dataclasses.replace(config, **{key: tuple(value)})


def _set_choice(kind: type[enum.Enum]):
    """A setter for the config field named like the option, holding a `kind` member."""

    def apply(config: GradQConfig, key: str, value: Any) -> GradQConfig:
        return dataclasses.replace(config, **{key: _choice(kind, key, value)})

    return apply


def _set_gradient_quantizer(config: GradQConfig, key: str, value: Any) -> GradQConfig:
    clipping = _choice(Clipping, key, value)
    return dataclasses.replace(
        config, gradient=dataclasses.replace(config.gradient, clipping=clipping)
    )


OPTIONS = {
    **{
        f"{operand}_{field}": _set_spec_field(operand, field, kind)
        for operand in ("weight", "activation", "gradient")
        for field, kind in (
            ("bits", _bits),
            ("granularity", Granularity),
            ("rounding", Rounding),
            ("clipping", Clipping),
            ("scaling", _flag),
        )
    },
    # The name the GradQ-ViT papers use for the gradient's clipping rule.
    "gradient_quantizer": _set_gradient_quantizer,
    "forward": _set_bool,
    "dgrad": _set_bool,
    "wgrad": _set_bool,
    "stats": _set_bool,
    "convolutions": _set_bool,
    "compile_once": _set_bool,
    "attention": _set_choice(Attention),
    "lowering": _set_choice(Lowering),
    "fallback": _set_choice(Fallback),
    "include": _set_globs,
    "exclude": _set_globs,
}
