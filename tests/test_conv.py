"""2-D convolutions that are GEMMs (1x1, patchify), rewritten to gradq's INT8 GEMMs.

Numerics run through `backend="gradq_eager"` (the rewrite and the lowering, without Inductor's
code generation) against F.conv2d in float64. Odd spatial sizes check that the layout change
strides and crops exactly as conv2d does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradq_fx import ops
from gradq_fx.backend import gradq_backend, gradq_eager_backend
from gradq_fx.quantizer import sqnr_db

ALL_FLOAT = {"forward": False, "dgrad": False, "wgrad": False}

# name: (in channels, out channels, kernel, stride, batch, height, width, bias)
CASES = {
    "1x1": (32, 48, 1, 1, 3, 14, 14, True),
    "1x1_stride2_odd": (32, 48, 1, 2, 3, 13, 11, False),
    "1x1_batch1": (32, 48, 1, 1, 1, 9, 7, True),
    "1x1_stride_2x3": (24, 16, 1, (2, 3), 3, 13, 11, True),
    "patch4_cropped": (3, 64, 4, 4, 3, 30, 29, True),  # conv2d drops 2 rows and 1 column
    "patch_2x3_batch1": (16, 40, (2, 3), (2, 3), 1, 17, 20, False),
    "patch16_deit": (3, 96, 16, 16, 2, 32, 32, True),
}
# Floors in dB for (output, input gradient, weight gradient), about 5 dB under what was
# measured with seed 0 (lowest over seeds 0-9 in brackets; torch 2.14.1, CPU, default config:
# per-row int8, iqr-clipped and least-squares-scaled gradients):
#   1x1               43.8 [43.7]  43.4 [43.2]  39.6 [39.1]
#   1x1_stride2_odd   43.7 [43.4]  43.4 [43.1]  40.8 [40.6]
#   1x1_batch1        43.6 [43.6]  43.3 [43.3]  41.3 [41.1]
#   1x1_stride_2x3    44.3 [44.0]  44.7 [44.1]  40.7 [40.2]
#   patch4_cropped    43.3 [43.3]  43.0 [42.9]  40.7 [40.4]
#   patch_2x3_batch1  42.9 [42.4]  43.5 [43.4]  42.2 [41.6]
#   patch16_deit      40.6 [40.6]  42.6 [42.5]  45.3 [45.0]
FLOORS = {
    "1x1": (38.5, 38.0, 34.5),
    "1x1_stride2_odd": (38.5, 38.0, 35.5),
    "1x1_batch1": (38.5, 38.0, 36.0),
    "1x1_stride_2x3": (39.0, 39.5, 35.5),
    "patch4_cropped": (38.0, 38.0, 35.5),
    "patch_2x3_batch1": (37.5, 38.5, 37.0),
    "patch16_deit": (35.5, 37.5, 40.0),
}


def make_case(name: str, seed: int = 0) -> tuple[torch.nn.Conv2d, torch.Tensor, torch.Tensor]:
    """The convolution, an input and an output gradient."""
    c_in, c_out, kernel, stride, batch, height, width, bias = CASES[name]
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(c_in, c_out, kernel, stride=stride, bias=bias)
    x = torch.randn(batch, c_in, height, width)
    with torch.no_grad():
        grad_out = torch.randn_like(conv(x))
    return conv, x, grad_out


def compiled_step(model, x, grad_out, options=None, backend=gradq_eager_backend):
    """Output, dX and parameter gradients of model(x) compiled by a gradq backend; asserts
    that every conv2d was rewritten."""
    targets = []

    def recording(gm, example_inputs):
        compiled = backend(gm, example_inputs, options)  # rewrites gm in place first
        targets.extend(node.target for node in gm.graph.nodes)
        return compiled

    model.zero_grad()
    x = x.clone().requires_grad_()
    out = torch.compile(model, backend=recording, fullgraph=True)(x)
    out.backward(grad_out)
    assert ops.quantized_conv2d in targets and F.conv2d not in targets
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.detach(), x.grad, grads


def gradq_step(conv, x, grad_out, options=None):
    """conv(x) through gradq_eager: output, dX, dW, db (None without a bias)."""
    out, dx, grads = compiled_step(conv, x, grad_out, options)
    return out, dx, grads["weight"], grads.get("bias")


def reference_step(conv, x, grad_out, dtype=torch.float64):
    """F.conv2d's output, dX, dW, db, computed in `dtype`."""
    x = x.to(dtype).requires_grad_()
    weight = conv.weight.detach().to(dtype).requires_grad_()
    bias = None if conv.bias is None else conv.bias.detach().to(dtype).requires_grad_()
    out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    out.backward(grad_out.to(dtype))
    return out.detach(), x.grad, weight.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("name", sorted(CASES))
def test_conv_tracks_float64(name):
    conv, x, grad_out = make_case(name)
    out, dx, dw, db = gradq_step(conv, x, grad_out)
    ref_out, ref_dx, ref_dw, ref_db = reference_step(conv, x, grad_out)

    assert out.shape == ref_out.shape and out.dtype == torch.float32 and out.is_contiguous()
    measured = (sqnr_db(ref_out, out), sqnr_db(ref_dx, dx), sqnr_db(ref_dw, dw))
    assert all(m >= f for m, f in zip(measured, FLOORS[name], strict=True)), measured
    assert not torch.equal(out.double(), ref_out)  # quantized, not float
    if db is not None:  # the bias gradient is a float reduction of dY
        torch.testing.assert_close(db, ref_db.float())


@pytest.mark.parametrize("name", sorted(CASES))
def test_layout_change_is_exact_with_every_role_float(name):
    # With the three GEMMs in float, what is left is the reshape and permute around them:
    # it must give F.conv2d's values (and gradients) to float32 rounding.
    conv, x, grad_out = make_case(name, seed=1)
    actual = gradq_step(conv, x, grad_out, ALL_FLOAT)
    expected = reference_step(conv, x, grad_out, dtype=torch.float32)
    for got, want in zip(actual, expected, strict=True):
        # Sums of up to 768 products in another order: float32 rounding, nothing more (a
        # wrong layout is off by the values' own size).
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_zero_input():
    conv, x, grad_out = make_case("1x1_stride2_odd")
    conv.bias = torch.nn.Parameter(torch.randn(conv.out_channels))
    out, dx, dw, db = gradq_step(conv, torch.zeros_like(x), grad_out)
    # Zero rows quantize to zero codes: the output is the bias, the weight gradient zero.
    assert torch.equal(out, conv.bias.detach().view(1, -1, 1, 1).expand_as(out))
    assert torch.equal(dw, torch.zeros_like(dw))
    _, ref_dx, _, ref_db = reference_step(conv, torch.zeros_like(x), grad_out)
    assert torch.isfinite(dx).all() and sqnr_db(ref_dx, dx) >= 38.0
    torch.testing.assert_close(db, ref_db.float())


def test_unbatched_input():
    conv, x, grad_out = make_case("patch4_cropped")
    out, dx, dw, _ = gradq_step(conv, x[0], grad_out[0])
    ref_out, ref_dx, ref_dw, _ = reference_step(conv, x[0], grad_out[0])
    assert out.shape == ref_out.shape == (64, 7, 7)
    assert sqnr_db(ref_out, out) >= 38.0
    assert sqnr_db(ref_dx, dx) >= 38.0 and sqnr_db(ref_dw, dw) >= 35.0


def test_bf16_autocast():
    conv, x, grad_out = make_case("1x1_stride2_odd")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, dw, _ = gradq_step(conv, x, grad_out.bfloat16())
        expected = conv(x)
    assert out.dtype == expected.dtype == torch.bfloat16 and dw.dtype == torch.float32
    ref_out, _, ref_dw, _ = reference_step(conv, x, grad_out)
    # bf16 itself carries ~8 bits of mantissa: the floors are those of bf16 vs bf16.
    assert sqnr_db(ref_out, out) > 30 and sqnr_db(ref_dw, dw) > 30


def test_quantized_conv2d_refuses_convolutions_that_are_no_gemm():
    site = ops.GemmSite("conv", ("", ""), ("", ""), ("", ""), "wgrad")
    x, weight = torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3)
    for stride, padding, groups in (((1, 1), (1, 1), 1), ((3, 3), (0, 0), 2), ((2, 2), 0, 1)):
        with pytest.raises(ValueError, match="quantized_conv2d takes groups 1, padding 0"):
            ops.quantized_conv2d(x, weight, None, stride, padding, 1, groups, site)


@pytest.mark.slow
def test_inductor_matches_gradq_eager():
    """The one conv test through Inductor: the same integers and scales as gradq_eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 4, stride=4), torch.nn.GELU(), torch.nn.Conv2d(32, 16, 1, stride=2)
    )
    x, grad_out = torch.randn(2, 3, 30, 29), torch.randn(2, 16, 4, 4)
    expected = compiled_step(model, x, grad_out)
    torch._dynamo.reset()
    actual = compiled_step(model, x, grad_out, backend=gradq_backend)
    # Inductor may fuse the float math around the GEMMs differently, moving a value across a
    # rounding boundary now and then.
    assert sqnr_db(expected[0], actual[0]) > 50 and sqnr_db(expected[1], actual[1]) > 50
    for name, grad in expected[2].items():
        assert sqnr_db(grad, actual[2][name]) > 50, name
