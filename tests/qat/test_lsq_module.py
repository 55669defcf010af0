"""LSQQuantizer and QKVQuantizers: initialisation, gradients, q/k/v separation, state dicts.

The references are the paper's formulas written here in float64 (value of one expression,
gradient of another), independently of gradq_fx.quantizer.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from gradq_fx import quantizer
from gradq_fx.qat import LSQQuantizer, QKVQuantizers, split_qkv


def bounds(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def reference(x, scale, offset, bits, signed, g):
    """LSQ fake quantization in float64 with the paper's straight-through gradients."""
    low, high = bounds(bits, signed)
    s = scale * g + (scale - scale * g).detach()
    v = (x if offset is None else x - offset) / s
    clipped = torch.where(v <= low, float(low), torch.where(v >= high, float(high), v))
    out = (clipped + (torch.round(clipped) - clipped).detach()) * s
    return out if offset is None else out + offset


def test_weight_quantizer_initialises_and_follows_the_formula():
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(11, 7, generator=gen) * 0.05).requires_grad_()
    q = LSQQuantizer(3, "weight")
    assert not q.initialised
    out = q(w)
    assert q.initialised
    assert q.scale.item() == quantizer.lsq_init_weight_scale(w.detach(), 3).item()
    upstream = torch.randn(11, 7, generator=gen)
    grad_w, grad_s = torch.autograd.grad(out, [w, q.scale], upstream)

    qp = 3
    g = 1 / math.sqrt(qp * w.detach().double().abs().sum().item())  # docs/method.md's weight g
    w64 = w.detach().double().requires_grad_()
    s64 = q.scale.detach().double().requires_grad_()
    expected = reference(w64, s64, None, 3, True, g)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)
    expected_w, expected_s = torch.autograd.grad(expected, [w64, s64], upstream.double())
    assert torch.equal(grad_w.double(), expected_w)
    torch.testing.assert_close(grad_s.double(), expected_s, rtol=1e-5, atol=1e-7)


def test_per_channel_weight_quantizer():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(5, 9, generator=gen) * torch.logspace(-3, 0, 5)[:, None]
    w.requires_grad_()
    q = LSQQuantizer(4, "weight", channels=5)
    out = q(w)
    assert q.scale.shape == (5,)
    torch.testing.assert_close(q.scale, quantizer.lsq_init_weight_scale(w.detach(), 4, True))
    upstream = torch.randn(5, 9, generator=gen)
    (grad_s,) = torch.autograd.grad(out, [q.scale], upstream)
    # Each channel's step gradient is its own row's, scaled by its own g.
    for row in range(5):
        g = 1 / math.sqrt(7 * w[row].detach().double().abs().sum().item())
        s64 = q.scale[row].detach().double().requires_grad_()
        expected = reference(w[row].detach().double(), s64, None, 4, True, g)
        (expected_s,) = torch.autograd.grad(expected, [s64], upstream[row].double())
        # float32 sums of terms up to Qp * |upstream| * g that largely cancel.
        atol = 1e-6 * g * 7 * upstream[row].abs().sum().item()
        torch.testing.assert_close(grad_s[row].double(), expected_s, rtol=1e-5, atol=atol)
    with pytest.raises(ValueError, match="per-channel"):
        q(torch.randn(4, 9))


def test_unsigned_activation_quantizer_with_offset():
    gen = torch.Generator().manual_seed(2)
    x = F.gelu(torch.randn(3, 17, 13, generator=gen) * 2).requires_grad_()
    q = LSQQuantizer(2, "activation", signed=False)
    assert [name for name, _ in q.named_parameters()] == ["scale", "offset"]
    out = q(x)
    torch.testing.assert_close(
        q.scale.detach().double(), 2 * x.detach().double().abs().mean() / math.sqrt(3)
    )
    assert q.offset.item() == 0.0
    with torch.no_grad():
        q.offset.fill_(-0.125)  # as if trained: GELU's negative tail gets a level
    out = q(x)
    assert out.min().item() == pytest.approx(-0.125)
    upstream = torch.randn(x.shape, generator=gen)
    grads = torch.autograd.grad(out, [x, q.scale, q.offset], upstream)

    g = 1 / math.sqrt(x.numel() * 3)  # docs/method.md's activation g, Qp = 2^2 - 1
    leaves = [t.detach().double().requires_grad_() for t in (x, q.scale, q.offset)]
    expected = reference(*leaves, 2, False, g)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-7)
    expected_grads = torch.autograd.grad(expected, leaves, upstream.double())
    assert torch.equal(grads[0].double(), expected_grads[0])
    for actual, wanted in zip(grads[1:], expected_grads[1:], strict=True):
        torch.testing.assert_close(actual.double(), wanted, rtol=1e-5, atol=1e-6)
    assert grads[2].item() != 0  # clipped values reach the offset


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(3)
    source = torch.nn.ModuleDict(
        {
            "w": LSQQuantizer(3, "weight", channels=4),
            "a": LSQQuantizer(4, "activation", signed=False),
        }
    )
    w, x = torch.randn(4, 6, generator=gen), torch.randn(2, 5, generator=gen).abs()
    source["w"](w), source["a"](x)
    with torch.no_grad():  # as an optimizer step would
        source["w"].scale.mul_(1.3)
        source["a"].offset.add_(-0.07)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert set(state) == {"w.scale", "w.initialised", "a.scale", "a.offset", "a.initialised"}

    restored = torch.nn.ModuleDict(
        {
            "w": LSQQuantizer(3, "weight", channels=4),
            "a": LSQQuantizer(4, "activation", signed=False),
        }
    )
    restored["w"](w * 100)  # ran (and initialised) on other data before the load
    restored.load_state_dict(state)
    for name, value in source.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    # The restored quantizers do not re-initialise: the same outputs as the source's.
    assert torch.equal(restored["w"](w), source["w"](w))
    assert torch.equal(restored["a"](x), source["a"](x))
    # An uninitialised state loaded into a used quantizer initialises again on its next call.
    fresh = LSQQuantizer(3, "weight", channels=4)
    restored["w"].load_state_dict(fresh.state_dict())
    restored["w"](w)
    torch.testing.assert_close(restored["w"].scale, quantizer.lsq_init_weight_scale(w, 3, True))


def test_quantizer_arguments_are_checked():
    with pytest.raises(ValueError, match="bits"):
        LSQQuantizer(9)
    with pytest.raises(ValueError, match="kind"):
        LSQQuantizer(4, "gradient")
    with pytest.raises(ValueError, match="signed"):
        LSQQuantizer(4, "weight", signed=False)
    with pytest.raises(ValueError, match="channels"):
        LSQQuantizer(4, "activation", channels=3)
    assert "unsigned+offset" in repr(LSQQuantizer(4, "activation", signed=False))


# --------------------------------------------------------------------------- q, k, v


def qkv_case(seed, dim=6, tokens=(2, 5)):
    """A fused qkv weight whose q, k and v blocks differ in magnitude by 10x each."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(3 * dim, dim, generator=gen)
    weight = weight * torch.tensor([0.01, 0.1, 1.0]).repeat_interleave(dim)[:, None]
    bias = torch.randn(3 * dim, generator=gen)
    x = torch.randn(*tokens, dim, generator=gen)
    return weight, bias, x


def test_split_qkv_blocks():
    weight = torch.arange(9 * 4.0).reshape(9, 4)
    q, k, v = split_qkv(weight)
    assert torch.equal(torch.cat([q, k, v]), weight) and q.shape == (3, 4)
    assert torch.equal(k, weight[3:6])
    with pytest.raises(ValueError, match="3D rows"):
        split_qkv(torch.zeros(7, 4))


@pytest.mark.parametrize("rows_per_block", [None, 6])
def test_qkv_quantizers_are_distinct_and_match_per_block_fake_quant(rows_per_block):
    weight, bias, x = qkv_case(seed=4)
    weight.requires_grad_()
    x.requires_grad_()
    module = QKVQuantizers(3, 4, rows_per_block=rows_per_block)
    out = module(x, weight, bias)
    assert out.shape == F.linear(x, weight, bias).shape == (2, 5, 18)

    quantizers = [*module.weight, *module.activation]
    assert len({id(q) for q in quantizers}) == 6
    assert len({id(p) for p in module.parameters()}) == 6
    # Blocks 10x apart in magnitude: three different weight steps.
    steps = [q.scale.detach().flatten()[0].item() for q in module.weight]
    assert steps[0] * 5 < steps[1] and steps[1] * 5 < steps[2]
    for q, block in zip(module.weight, split_qkv(weight.detach()), strict=True):
        torch.testing.assert_close(
            q.scale, quantizer.lsq_init_weight_scale(block, 3, rows_per_block is not None)
        )

    # The reference: each block quantized with its own step sizes, F.linear per block, then
    # concatenated in q, k, v order, in float64.
    blocks = []
    for i, block in enumerate(split_qkv(weight.detach().double())):
        w_scale = module.weight[i].scale.detach().double()
        if rows_per_block is not None:
            w_scale = w_scale[:, None]
        w_q = reference(block, w_scale, None, 3, True, 1.0)
        x_q = reference(x.detach().double(), module.activation[i].scale.detach().double(),
                        None, 4, True, 1.0)  # fmt: skip
        blocks.append(F.linear(x_q, w_q, bias.double()[6 * i : 6 * (i + 1)]))
    torch.testing.assert_close(out.double(), torch.cat(blocks, dim=-1), rtol=1e-5, atol=1e-6)

    # Every step size gets its own gradient (only q's outputs feed the loss: only q's learn).
    loss = out[..., :6].square().sum()
    loss.backward()
    grads = [q.scale.grad for q in quantizers]
    assert grads[0].abs().sum() > 0 and grads[3].abs().sum() > 0
    for index in (1, 2, 4, 5):
        assert grads[index] is None or grads[index].abs().sum() == 0


def test_qkv_shared_input_quantizer():
    weight, bias, x = qkv_case(seed=5)
    module = QKVQuantizers(4, 4, separate_inputs=False)
    out = module(x, weight, bias)
    assert len(module.activation) == 1
    expected = F.linear(module.activation[0](x), module.quantized_weight(weight), bias)
    assert torch.equal(out, expected)
    # With three input quantizers initialised alike, the result is the same.
    separate = QKVQuantizers(4, 4)
    torch.testing.assert_close(separate(x, weight, bias), out, rtol=1e-6, atol=1e-6)


def test_quantizers_compile_fullgraph():
    """No graph break: the autograd.Function traces, and the eager-only initialisation check
    stays out of the graph (the quantizers are initialised by an eager call first)."""
    weight, bias, x = qkv_case(seed=6)
    weight.requires_grad_()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = QKVQuantizers(3, 4, rows_per_block=6)
            self.post_gelu = LSQQuantizer(2, "activation", signed=False)

        def forward(self, x, weight, bias):
            return self.post_gelu(F.gelu(self.qkv(x, weight, bias)))

    block = Block()

    def run(fn):
        out = fn(x, weight, bias)
        return out, torch.autograd.grad(out.square().sum(), [weight, *block.parameters()])

    eager, eager_grads = run(block)
    compiled, compiled_grads = run(torch.compile(block, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled, eager)
    assert len(compiled_grads) == 1 + 6 + 2
    for a, e in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, e)
