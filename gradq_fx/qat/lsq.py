"""LSQ quantizers as modules: learnable step sizes (and offsets) the optimizer sees.

One `LSQQuantizer` per quantized operand: one per Linear weight, one per activation input.
Timm fuses q, k and v into one `qkv` Linear; the Quantization Variation paper gives each its
own quantizers (docs/method.md), which `QKVQuantizers` does on the fused weight without splitting
the module. The numerics live in `gradq_fx.quantizer` (the LSQ section); this file holds state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradq_fx import ops, quantizer

KINDS = ("weight", "activation")


class LSQQuantizer(nn.Module):
    """Fake quantization with a learnable step size `scale` (and `offset` when unsigned).

    bits: 2 to 8. kind: "weight" (signed; MSE-fit initial step) or "activation" (initial step
    2 * mean|x| / sqrt(Qp) from the first batch). signed=False (activations only, e.g. after
    GELU) adds a learnable `offset`, initialised to 0 as in the official code. channels: one step
    size per output channel (row of dim 0) of a weight; None for one per tensor.

    `initialised` (a buffer, saved with the parameters) says whether the step size has been set
    from data. An uninitialised quantizer initialises itself from the first tensor it sees when
    run eagerly; under torch.compile it cannot (that needs a host read), so call `initialise`
    (or run one eager batch) before compiling.
    """

    def __init__(
        self,
        bits: int,
        kind: str = "weight",
        signed: bool = True,
        channels: int | None = None,
    ):
        super().__init__()
        quantizer.lsq_bounds(bits, signed)  # validates bits
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "weight" and not signed:
            raise ValueError("weight quantizers are signed (no offset)")
        if channels is not None and (kind != "weight" or channels < 1):
            raise ValueError(f"channels is a positive count for weights only, got {channels!r}")
        self.bits, self.kind, self.signed, self.channels = bits, kind, signed, channels
        shape = () if channels is None else (channels,)
        self.scale = nn.Parameter(torch.ones(shape))
        self.offset = None if signed else nn.Parameter(torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        # Host-side memo of `initialised`, so an eager forward reads the buffer (a device sync
        # on GPU) only until it first finds it set; reset whenever a state dict is loaded.
        self._seen_initialised = False

    def extra_repr(self) -> str:
        granularity = "per_tensor" if self.channels is None else f"channels={self.channels}"
        sign = "signed" if self.signed else "unsigned+offset"
        return f"bits={self.bits}, kind={self.kind}, {sign}, {granularity}"

    def _load_from_state_dict(self, *args, **kwargs):
        self._seen_initialised = False
        super()._load_from_state_dict(*args, **kwargs)

    def _check(self, x: torch.Tensor) -> None:
        if self.channels is not None and (x.dim() < 1 or x.shape[0] != self.channels):
            raise ValueError(
                f"{self.channels} per-channel step sizes for a tensor of shape {tuple(x.shape)}"
            )

    def _scale_for(self, x: torch.Tensor) -> torch.Tensor:
        """The step size broadcastable against x: 0-dim, or [C, 1, ...] per channel."""
        if self.channels is None:
            return self.scale
        return self.scale.reshape(self.channels, *([1] * (x.dim() - 1)))

    @torch.no_grad()
    def initialise(self, x: torch.Tensor) -> None:
        """Set the step size from x (the weight, or one batch of the activation)."""
        self._check(x)
        if self.kind == "weight":
            value = quantizer.lsq_init_weight_scale(x, self.bits, self.channels is not None)
        else:
            value = quantizer.lsq_init_activation_scale(x, self.bits, self.signed)
        self.scale.copy_(value)
        self.initialised.fill_(True)

    def grad_scale(self, x: torch.Tensor) -> torch.Tensor | float:
        """The step size's gradient scale g for this x (docs/method.md)."""
        if self.kind == "weight":
            return quantizer.lsq_weight_grad_scale(x, self.bits, self.channels is not None)
        return quantizer.lsq_activation_grad_scale(x, self.bits, self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        if not torch.compiler.is_compiling() and not self._seen_initialised:
            if not bool(self.initialised):
                self.initialise(x.detach())
            self._seen_initialised = True
        return ops.lsq_node(
            x,
            self._scale_for(x),
            self.offset,
            bits=self.bits,
            signed=self.signed,
            grad_scale=self.grad_scale(x),
        )

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of x (float32, no gradient): for the oscillation tracker."""
        self._check(x)
        return quantizer.lsq_codes(x, self._scale_for(x), self.offset, self.bits, self.signed)

    def clipped(self, x: torch.Tensor) -> torch.Tensor:
        """x clipped to the quantizer's range (differentiable): for the bin regularizer."""
        self._check(x)
        return quantizer.lsq_clipped(x, self._scale_for(x), self.offset, self.bits, self.signed)


def split_qkv(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k and v row blocks of a fused qkv weight [3D, D] (or bias [3D]), as views.

    Timm's `qkv` Linear puts q's D output rows first, then k's, then v's.
    """
    if tensor.dim() < 1 or tensor.shape[0] % 3:
        raise ValueError(f"a fused qkv tensor has 3D rows, got shape {tuple(tensor.shape)}")
    q, k, v = tensor.chunk(3, dim=0)
    return q, k, v


class QKVQuantizers(nn.Module):
    """Separate quantizers for q, k and v of one fused `qkv` Linear.

    weight[i] quantizes row block i of the [3D, D] weight; activation[i] quantizes the input
    that block i sees. `separate_inputs=False` shares one input quantizer (the official code's
    layout: one quantized input, three projections); the default gives each projection its own
    input step size, learnt from that projection's gradient alone. `forward(x, weight, bias)`
    returns F.linear's layout for the fused layer: [..., 3D], q's outputs first.
    """

    def __init__(
        self,
        weight_bits: int,
        activation_bits: int,
        rows_per_block: int | None = None,
        separate_inputs: bool = True,
    ):
        super().__init__()
        self.weight = nn.ModuleList(
            LSQQuantizer(weight_bits, "weight", channels=rows_per_block) for _ in range(3)
        )
        self.activation = nn.ModuleList(
            LSQQuantizer(activation_bits, "activation") for _ in range(3 if separate_inputs else 1)
        )

    def quantized_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The fused weight with each row block fake-quantized by its own quantizer, [3D, D]."""
        blocks = split_qkv(weight)
        return torch.cat([q(block) for q, block in zip(self.weight, blocks, strict=True)])

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        blocks = split_qkv(weight)
        biases = split_qkv(bias) if bias is not None else (None, None, None)
        inputs = [a(x) for a in self.activation]
        if len(inputs) == 1:
            return F.linear(inputs[0], self.quantized_weight(weight), bias)
        outputs = [
            F.linear(inp, q(block), b)
            for inp, q, block, b in zip(inputs, self.weight, blocks, biases, strict=True)
        ]
        return torch.cat(outputs, dim=-1)
