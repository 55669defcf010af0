"""LSQ quantizers on a model's Linears: `attach_lsq(model, config)`, then `initialise_lsq`.

Each nn.Linear that the config's include/exclude globs select becomes an `LSQLinear` (a
subclass of nn.Linear holding the same weight and bias Parameters, so state-dict keys and
optimizer parameters stay those of the Linear) whose forward is

    F.linear(input_quantizer(x), weight_quantizer(weight), bias)

with learnable step sizes (docs/method.md, "Low-bit QAT"):
- weights: one per-tensor signed quantizer at the config's weight bits, step size MSE-fitted
  when attached, gradient scale 1/sqrt(Qp * sum|w|);
- inputs: one per-tensor quantizer at the config's activation bits, step size 2 mean|x| /
  sqrt(Qp) from the first batch (`initialise_lsq`), gradient scale 1/sqrt(N * Qp); unsigned
  with a learnable offset for the input of an MLP's fc2 (it follows a GELU);
- timm's fused `qkv` Linear: q, k and v get their own weight and input quantizers
  (`QKVQuantizers`), computed as three GEMMs whose outputs are concatenated.

The quantization is `torch.ops.gradq.lsq_fake_quantize` (`gradq_fx.ops`), one graph node per
operand, so gradq's rewrite sees that the forward GEMM's operands are quantized already: it
runs that GEMM in float on them ("LSQ fake-quant W4A4" in the report) and quantizes only its
backward GEMMs (dgrad, wgrad: INT8, the gradient's spec). Without torch.compile, or under
another backend, the model simply trains with LSQ fake quantization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradq_fx.config import GradQConfig
from gradq_fx.passes.annotate import filter_reason
from gradq_fx.qat.lsq import LSQQuantizer, QKVQuantizers, split_qkv


class LSQLinear(nn.Linear):
    """An nn.Linear with LSQ quantizers on its weight and input (module docstring).

    Build with `LSQLinear.wrap(linear, weight_bits, activation_bits, ...)`. Exactly one of
    `qkv_quantizers` (a fused qkv projection) or `weight_quantizer` with `input_quantizer` is
    set.
    """

    @classmethod
    def wrap(
        cls,
        linear: nn.Linear,
        weight_bits: int,
        activation_bits: int,
        fused_qkv: bool = False,
        unsigned_input: bool = False,
    ) -> LSQLinear:
        if fused_qkv and unsigned_input:
            raise ValueError("a fused qkv projection's input is not unsigned")
        has_bias = linear.bias is not None
        # On the meta device: the weight and bias are replaced by the Linear's own at once.
        new = cls(linear.in_features, linear.out_features, has_bias, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        device = linear.weight.device
        if fused_qkv:
            new.qkv_quantizers = QKVQuantizers(weight_bits, activation_bits).to(device)
            new.weight_quantizer = new.input_quantizer = None
        else:
            new.qkv_quantizers = None
            new.weight_quantizer = LSQQuantizer(weight_bits, "weight").to(device)
            new.input_quantizer = LSQQuantizer(
                activation_bits, "activation", signed=not unsigned_input
            ).to(device)
        for weight, quantizer in new.quantized_weights():
            quantizer.initialise(weight.detach())
        return new

    def quantized_weights(self) -> list[tuple[torch.Tensor, LSQQuantizer]]:
        """(weight or weight block, its quantizer): one pair, or q, k, v's three blocks."""
        if self.qkv_quantizers is not None:
            blocks = split_qkv(self.weight)
            return list(zip(blocks, self.qkv_quantizers.weight, strict=True))
        return [(self.weight, self.weight_quantizer)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qkv_quantizers is not None:
            return self.qkv_quantizers(x, self.weight, self.bias)
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


def _is_fused_qkv(name: str, linear: nn.Linear) -> bool:
    """timm's fused attention projection: a Linear named `qkv` with 3D outputs for D inputs."""
    return name.rsplit(".", 1)[-1] == "qkv" and linear.out_features == 3 * linear.in_features


def _follows_gelu(name: str, parent: nn.Module) -> bool:
    """An MLP's fc2 whose sibling `act` is a GELU (timm's Mlp: fc1, act, ..., fc2)."""
    act = getattr(parent, "act", None)
    return name.rsplit(".", 1)[-1] == "fc2" and act is not None and "GELU" in type(act).__name__


def attach_lsq(model: nn.Module, config: GradQConfig) -> list[str]:
    """Replace each nn.Linear of `model` that config.include / config.exclude select by an
    `LSQLinear` at config.weight.bits and config.activation.bits, in place; return their
    module paths. Weight step sizes are fitted now; input step sizes need one batch: call
    `initialise_lsq(model, inputs)` before torch.compile (compiled code cannot read a flag on
    the host to initialise lazily). Build the optimizer afterwards: the step sizes and offsets
    are new Parameters.
    """
    if not isinstance(config, GradQConfig):
        raise ValueError(f"config must be a GradQConfig, got {type(config).__name__}")
    attached = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or filter_reason(name, config) is not None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapped = LSQLinear.wrap(
            module,
            config.weight.bits,
            config.activation.bits,
            fused_qkv=_is_fused_qkv(name, module),
            unsigned_input=_follows_gelu(name, parent),
        )
        setattr(parent, child, wrapped)
        attached.append(name)
    return attached


def lsq_linears(model: nn.Module) -> dict[str, LSQLinear]:
    """The LSQLinears of a model by module path (through torch.compile's and DDP's wrappers)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LSQLinear)}


def quantized_weights(model: nn.Module) -> list[tuple[str, torch.Tensor, LSQQuantizer]]:
    """(name, weight or q/k/v block, quantizer) of every LSQ weight quantizer of the model."""
    out = []
    for name, linear in lsq_linears(model).items():
        pairs = linear.quantized_weights()
        suffixes = ("q", "k", "v") if len(pairs) == 3 else ("weight",)
        out += [(f"{name}.{s}", w, q) for s, (w, q) in zip(suffixes, pairs, strict=True)]
    return out


@torch.no_grad()
def initialise_lsq(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Run `model` once eagerly, in eval mode, on `inputs` so every LSQ input quantizer that is
    not initialised yet takes its step size from this batch; return how many were.

    Eval mode: the batch's statistics without dropout, and no random numbers drawn, so a run's
    random stream does not depend on it.
    """
    quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
    pending = [q for q in quantizers if not bool(q.initialised)]
    was_training = model.training
    model.eval()
    try:
        model(*inputs)
    finally:
        model.train(was_training)
    return sum(1 for q in pending if bool(q.initialised))


def lsq_bits(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module path: (weight bits, activation bits)} of the model's LSQLinears, for checkpoints."""
    out = {}
    for name, linear in lsq_linears(model).items():
        weight_quantizer = linear.quantized_weights()[0][1]
        inputs = (
            linear.qkv_quantizers.activation
            if linear.qkv_quantizers is not None
            else [linear.input_quantizer]
        )
        out[name] = (weight_quantizer.bits, inputs[0].bits)
    return out
