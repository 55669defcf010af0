"""Low-bit forward GEMMs under gradq: fake quantization below 8 bits, and LSQ operands.

References are written here in float64 from the formulas (min-max: s = absmax / (2^(b-1) - 1)
per row; LSQ: clamp(round((x - offset) / s), low, high) * s + offset), not from gradq_fx.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from gradq_fx import quantizer
from gradq_fx.config import GradQConfig, QuantSpec
from gradq_fx.qat import LSQLinear, attach_lsq, initialise_lsq
from gradq_fx.report import report


def minmax64(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Symmetric min-max fake quantization with one scale per slice along `dim`, float64."""
    qmax = 2 ** (bits - 1) - 1
    x = x.double()
    scale = x.abs().amax(dim=dim, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / scale).clamp(-qmax, qmax) * scale


def lsq64(x: torch.Tensor, scale, bits: int, offset=None) -> torch.Tensor:
    """LSQ fake quantization, float64: signed without offset, unsigned with one."""
    if offset is None:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        offset = 0.0
    else:
        low, high, offset = 0, 2**bits - 1, float(offset.detach())
    s = float(scale.detach())
    return torch.round((x.double() - offset) / s).clamp(low, high) * s + offset


def accumulation_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A float32 GEMM's rounding bound: K ulps of the sum of |terms| (a, b float64)."""
    return a.shape[-1] * 2.0**-24 * (a.abs() @ b.abs())


class TinyMlp(nn.Module):
    """timm's Mlp layout: fc1, a GELU named act, fc2."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(24, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def rows_by_role(result, graph: str = "fwd"):
    return [row for row in result.gemms if row.graph == graph]


@pytest.mark.parametrize(("weight_bits", "activation_bits"), [(4, 4), (3, 2), (2, 6)])
def test_fake_quant_below_8_bits_matches_direct_computation(weight_bits, activation_bits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 10))
    x = torch.randn(5, 7, 24) * torch.logspace(-2, 1, 24)  # channels of very different scale
    options = {"weight_bits": weight_bits, "activation_bits": activation_bits}
    out = torch.compile(model, backend="gradq_eager", options=options)(x)

    layer = model[0]
    x_q = minmax64(x, activation_bits, dim=-1)  # one scale per token
    w_q = minmax64(layer.weight.detach(), weight_bits, dim=-1)  # one per output channel
    expected = x_q @ w_q.T + layer.bias.detach().double()
    bound = accumulation_bound(x_q, w_q.T) + 1e-7 * layer.bias.abs().max().item()
    assert bool(((out.detach().double() - expected).abs() <= bound).all())
    # And it is a low-bit result, far from the float one.
    assert (out.double() - x.double() @ layer.weight.double().T).abs().max() > 100 * bound.max()

    result = report(model, (x.requires_grad_(),), options)  # an input gradient: a dgrad too
    (forward,) = rows_by_role(result)
    assert forward.lowering == f"fake-quant W{weight_bits}A{activation_bits}"
    backward = rows_by_role(result, "bwd")
    assert {row.role for row in backward} == {"dgrad", "wgrad"}
    for row in backward:  # INT8 GEMMs: the gradient's spec, the other operand at 8 bits
        assert row.lowering == "reference"
        assert QuantSpec.decode(row.a_spec).bits == QuantSpec.decode(row.b_spec).bits == 8
    assert [row.role for row in result.int8_gemms] == ["dgrad", "wgrad"]


def test_eight_bits_keeps_the_int8_path():
    model = nn.Sequential(nn.Linear(24, 10))
    result = report(model, (torch.randn(6, 24, requires_grad=True),), {})
    assert [row.lowering for row in result.gemms] == ["reference"] * 3
    assert len(result.int8_gemms) == 3


def lsq_mlp(bits: int = 4) -> tuple[TinyMlp, torch.Tensor]:
    torch.manual_seed(1)
    model = TinyMlp()
    config = GradQConfig.from_options({"weight_bits": bits, "activation_bits": bits})
    assert attach_lsq(model, config) == ["fc1", "fc2"]
    x = torch.randn(6, 12)
    assert initialise_lsq(model, x) == 2
    return model, x


def mlp_reference(model: TinyMlp, x: torch.Tensor, bits: int) -> torch.Tensor:
    """The LSQ MLP in float64 from its step sizes (no second quantization)."""
    fc1, fc2 = model.fc1, model.fc2
    x_q = lsq64(x, fc1.input_quantizer.scale, bits)
    w1 = lsq64(fc1.weight.detach(), fc1.weight_quantizer.scale, bits)
    hidden = F.gelu(x_q @ w1.T + fc1.bias.detach().double())
    h_q = lsq64(hidden, fc2.input_quantizer.scale, bits, fc2.input_quantizer.offset)
    w2 = lsq64(fc2.weight.detach(), fc2.weight_quantizer.scale, bits)
    return h_q @ w2.T + fc2.bias.detach().double()


@pytest.mark.parametrize("backend", ["gradq_eager", pytest.param("gradq", marks=pytest.mark.slow)])
def test_lsq_operands_are_not_quantized_twice(backend):
    model, x = lsq_mlp(bits=4)
    with torch.no_grad():  # learn a nonzero offset, so the unsigned path is exercised
        model.fc2.input_quantizer.offset.fill_(-0.05)
    expected = mlp_reference(model, x, bits=4)
    eager = model(x)
    compiled = torch.compile(model, backend=backend)(x)
    tolerance = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(eager.double(), expected, rtol=0, atol=tolerance)
    torch.testing.assert_close(compiled.double(), expected, rtol=0, atol=tolerance)

    # Quantizing the LSQ outputs once more (INT8 per row, gradq's default forward) would
    # move the output by far more than that tolerance: the test can tell.
    spec = QuantSpec()
    fc2 = model.fc2
    hidden = fc2.input_quantizer(F.gelu(model.fc1(x))).detach()
    w2 = fc2.weight_quantizer(fc2.weight).detach()
    twice = quantizer.quantized_matmul(hidden, w2.T, spec, spec, fc2.bias.detach())
    assert (twice.double() - expected).abs().max() > 20 * tolerance

    result = report(model, (x,), {})
    forward = rows_by_role(result)
    assert [row.module for row in forward] == ["fc1", "fc2"]
    for row in forward:
        assert (row.a_spec, row.b_spec) == ("lsq:4", "lsq:4")
        assert row.lowering == "LSQ fake-quant W4A4"
    backward = rows_by_role(result, "bwd")
    assert len(backward) == 4 and all(row.lowering == "reference" for row in backward)


def test_attach_lsq_selects_by_globs_keeps_parameters_and_initialises():
    torch.manual_seed(2)
    model = TinyMlp()
    weight, bias = model.fc1.weight, model.fc1.bias
    keys = set(model.state_dict())
    config = GradQConfig.from_options({"weight_bits": 3, "activation_bits": 5, "exclude": ["fc2"]})
    assert attach_lsq(model, config) == ["fc1"]
    assert isinstance(model.fc1, LSQLinear) and type(model.fc2) is nn.Linear
    assert model.fc1.weight is weight and model.fc1.bias is bias  # same Parameters
    assert keys < set(model.state_dict())
    fc1 = model.fc1
    assert fc1.weight_quantizer.bits == 3 and fc1.input_quantizer.bits == 5
    assert fc1.input_quantizer.signed and fc1.input_quantizer.offset is None
    expected = quantizer.lsq_init_weight_scale(weight.detach(), 3)
    assert torch.equal(fc1.weight_quantizer.scale.detach(), expected)
    x = torch.randn(9, 12)
    initialise_lsq(model, x)
    expected = 2 * x.double().abs().mean() / 15**0.5  # 5-bit signed: Qp = 15
    torch.testing.assert_close(fc1.input_quantizer.scale.double(), expected, rtol=1e-6, atol=0)

    # fc2 follows a GELU: its input quantizer is unsigned with an offset, Qp = 2^4 - 1.
    model = TinyMlp()
    attach_lsq(model, GradQConfig.from_options({"weight_bits": 4, "activation_bits": 4}))
    seen = []
    model.fc2.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    initialise_lsq(model, x)
    quantizer_ = model.fc2.input_quantizer
    assert not quantizer_.signed and isinstance(quantizer_.offset, nn.Parameter)
    expected = 2 * seen[0].double().abs().mean() / 15**0.5
    torch.testing.assert_close(quantizer_.scale.double(), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="config must be a GradQConfig"):
        attach_lsq(model, {"weight_bits": 4})


def test_qkv_quantizers_are_distinct_and_receive_gradients():
    torch.manual_seed(3)
    model = timm.create_model(
        "deit_tiny_patch16_224", num_classes=4, img_size=16, patch_size=4, depth=1
    )
    config = GradQConfig.from_options({"weight_bits": 4, "activation_bits": 4})
    attach_lsq(model, config)
    x = torch.randn(2, 3, 16, 16)
    initialise_lsq(model, x)
    qkv = model.blocks[0].attn.qkv
    weights, inputs = list(qkv.qkv_quantizers.weight), list(qkv.qkv_quantizers.activation)
    parameters = [q.scale for q in weights + inputs]
    assert len({id(p) for p in parameters}) == 6
    assert {id(p) for p in parameters} <= {id(p) for p in model.parameters()}
    # Each block has its own fitted step: q, k and v weights differ, and so do the steps.
    steps = [q.scale.item() for q in weights]
    assert len(set(steps)) == 3

    # Eager: each third of the output is its own block's LSQ GEMM.
    tokens = torch.randn(2, 5, 192)
    out = qkv(tokens).detach().double()
    for index, (block, bias) in enumerate(zip(qkv.weight.chunk(3), qkv.bias.chunk(3), strict=True)):
        x_q = lsq64(tokens, inputs[index].scale, 4)
        w_q = lsq64(block.detach(), weights[index].scale, 4)
        expected = x_q @ w_q.T + bias.detach().double()
        got = out[..., 192 * index : 192 * (index + 1)]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max())

    # Compiled with gradq: every step size gets a gradient of its own.
    compiled = torch.compile(model, backend="gradq_eager")
    compiled(x).square().sum().backward()
    grads = [p.grad for p in parameters]
    assert all(g is not None and torch.isfinite(g) and g != 0 for g in grads)
    assert len({g.item() for g in grads}) == 6
