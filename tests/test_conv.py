"""2-D convolutions rewritten to gradq's INT8 GEMMs: the ones that are GEMMs (1x1, patchify)
as `gradq.mm`s, dense k x k ones (padding, overlapping windows) as implicit GEMMs
(`gradq.conv2d`).

Numerics run through `backend="gradq_eager"` (the rewrite and the lowering, without Inductor's
code generation) against F.conv2d in float64. Odd spatial sizes check that the layout change
strides and crops exactly as conv2d does, and that the implicit GEMM pads as it does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradq_fx import targets
from gradq_fx.backend import gradq_backend, gradq_eager_backend
from gradq_fx.quantizer import sqnr_db

ALL_FLOAT = {"forward": False, "dgrad": False, "wgrad": False}

# name: (in channels, out channels, kernel, stride, padding, batch, height, width, bias)
CASES = {
    "1x1": (32, 48, 1, 1, 0, 3, 14, 14, True),
    "1x1_stride2_odd": (32, 48, 1, 2, 0, 3, 13, 11, False),
    "1x1_batch1": (32, 48, 1, 1, 0, 1, 9, 7, True),
    "1x1_stride_2x3": (24, 16, 1, (2, 3), 0, 3, 13, 11, True),
    "patch4_cropped": (3, 64, 4, 4, 0, 3, 30, 29, True),  # conv2d drops 2 rows and 1 column
    "patch_2x3_batch1": (16, 40, (2, 3), (2, 3), 0, 1, 17, 20, False),
    "patch16_deit": (3, 96, 16, 16, 0, 2, 32, 32, True),
    # Dense convolutions: implicit GEMMs.
    "3x3_stride2_pad1_odd": (13, 17, 3, 2, 1, 3, 13, 11, True),
    "3x3_pad1": (16, 32, 3, 1, 1, 2, 13, 7, True),
    "3x3_pad0_odd": (7, 11, 3, 1, 0, 2, 9, 13, False),
    "5x5_stride2_pad2": (8, 12, 5, 2, 2, 2, 15, 9, True),
    "3x3_stem": (3, 16, 3, 2, 1, 2, 33, 31, False),  # MobileViT's stem, on an odd image
}


def _is_dense(name: str) -> bool:
    c_in, c_out, kernel, stride, padding = CASES[name][:5]
    kernel, stride, padding = (torch.nn.modules.utils._pair(v) for v in (kernel, stride, padding))
    return not targets.conv2d_is_gemm(kernel, stride, padding, (1, 1), 1)


DENSE = sorted(filter(_is_dense, CASES))
# Floors in dB for (output, input gradient, weight gradient), about 5 dB under what was
# measured with seed 0 (lowest over seeds 0-9 in brackets; torch 2.14.1, CPU, default config:
# per-row int8, iqr-clipped and least-squares-scaled gradients; implicit GEMMs scale X and dY
# per image in forward and dgrad, per channel in wgrad):
#   1x1                    43.8 [43.7]  43.4 [43.2]  39.6 [39.1]
#   1x1_stride2_odd        43.7 [43.4]  43.4 [43.1]  40.8 [40.6]
#   1x1_batch1             43.6 [43.6]  43.3 [43.3]  41.3 [41.1]
#   1x1_stride_2x3         44.3 [44.0]  44.7 [44.1]  40.7 [40.2]
#   patch4_cropped         43.3 [43.3]  43.0 [42.9]  40.7 [40.4]
#   patch_2x3_batch1       42.9 [42.4]  43.5 [43.4]  42.2 [41.6]
#   patch16_deit           40.6 [40.6]  42.6 [42.5]  45.3 [45.0]
#   3x3_stride2_pad1_odd   40.9 [40.9]  40.8 [40.6]  39.7 [39.7]
#   3x3_pad1               41.3 [39.8]  40.0 [40.0]  40.4 [40.2]
#   3x3_pad0_odd           41.1 [40.1]  41.9 [40.8]  40.6 [39.9]
#   5x5_stride2_pad2       42.3 [40.0]  40.7 [40.6]  40.8 [40.3]
#   3x3_stem               40.3 [40.1]  40.2 [39.8]  39.0 [38.5]
# The dense convolutions' outputs sit 2-3 dB under the 1x1 ones (per-image scales of X and
# longer sums both differ; not separated here).
FLOORS = {
    "1x1": (38.5, 38.0, 34.5),
    "1x1_stride2_odd": (38.5, 38.0, 35.5),
    "1x1_batch1": (38.5, 38.0, 36.0),
    "1x1_stride_2x3": (39.0, 39.5, 35.5),
    "patch4_cropped": (38.0, 38.0, 35.5),
    "patch_2x3_batch1": (37.5, 38.5, 37.0),
    "patch16_deit": (35.5, 37.5, 40.0),
    "3x3_stride2_pad1_odd": (36.0, 35.5, 34.5),
    "3x3_pad1": (36.0, 35.0, 35.0),
    "3x3_pad0_odd": (36.0, 36.5, 35.5),
    "5x5_stride2_pad2": (37.0, 35.5, 35.5),
    "3x3_stem": (35.0, 35.0, 34.0),
}


def make_case(name: str, seed: int = 0) -> tuple[torch.nn.Conv2d, torch.Tensor, torch.Tensor]:
    """The convolution, an input and an output gradient."""
    c_in, c_out, kernel, stride, padding, batch, height, width, bias = CASES[name]
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias)
    x = torch.randn(batch, c_in, height, width)
    with torch.no_grad():
        grad_out = torch.randn_like(conv(x))
    return conv, x, grad_out


def compiled_step(model, x, grad_out, options=None, backend=gradq_eager_backend):
    """Output, dX and parameter gradients of model(x) compiled by a gradq backend; asserts
    that every conv2d was rewritten."""
    called = []

    def recording(gm, example_inputs):
        compiled = backend(gm, example_inputs, options)  # rewrites gm in place first
        called.extend(node.target for node in gm.graph.nodes)
        return compiled

    model.zero_grad()
    x = x.clone().requires_grad_()
    out = torch.compile(model, backend=recording, fullgraph=True)(x)
    out.backward(grad_out)
    assert targets.gradq_conv2d in called and F.conv2d not in called
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


def test_gradq_conv2d_refuses_grouped_and_dilated_convolutions():
    site = targets.GemmSite("conv", ("", ""), ("", ""), ("", ""), "W")
    x, weight = torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3)
    for dilation, groups in ((1, 2), (2, 1)):
        with pytest.raises(ValueError, match="gradq_conv2d takes groups 1 and dilation 1"):
            w = weight[:, : 4 // groups]
            targets.gradq_conv2d(x, w, None, (1, 1), (1, 1), dilation, groups, site)


class RoleRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op, role) of every gradq GEMM that runs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.gradq.conv2d.default:
            self.calls.append(("conv2d", args[8]))
        elif func is torch.ops.gradq.mm.default:
            self.calls.append(("mm", args[5]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["3x3_pad1", "1x1"])
def test_dense_convolutions_are_implicit_gemms_the_others_gemms(name):
    conv, x, grad_out = make_case(name)
    site = targets.GemmSite("conv", ("", ""), ("", ""), ("", ""), "W")
    x = x.requires_grad_()
    with RoleRecorder() as recorder:
        out = targets.gradq_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, 1, 1, site)
        out.backward(grad_out)
    op = "conv2d" if name in DENSE else "mm"
    assert recorder.calls == [(op, "forward"), (op, "dgrad"), (op, "wgrad")]


@pytest.mark.parametrize("name", ["3x3_stride2_pad1_odd", "5x5_stride2_pad2"])
def test_dense_zero_input_gives_the_bias_and_a_zero_weight_gradient(name):
    conv, x, grad_out = make_case(name)
    out, dx, dw, db = gradq_step(conv, torch.zeros_like(x), grad_out)
    assert torch.equal(out, conv.bias.detach().view(1, -1, 1, 1).expand_as(out))
    assert torch.equal(dw, torch.zeros_like(dw))
    _, ref_dx, _, ref_db = reference_step(conv, torch.zeros_like(x), grad_out)
    assert sqnr_db(ref_dx, dx) >= FLOORS[name][1]
    torch.testing.assert_close(db, ref_db.float())


def test_dense_per_tensor_and_iqs_track_float64():
    conv, x, grad_out = make_case("3x3_stride2_pad1_odd")
    ref = reference_step(conv, x, grad_out)
    per_tensor = {f"{o}_granularity": "per_tensor" for o in ("weight", "activation", "gradient")}
    # Measured with seed 0 (lowest over seeds 0-4 in brackets): per tensor 40.5 / 39.7 / 37.9
    # dB [39.8 / 39.7 / 37.9]; IQS gradients (simulated: float convolutions of the decoded
    # codebook) 40.9 / 26.2 / 25.9 [40.9 / 25.5 / 25.0], as for a 1x1 convolution's GEMMs
    # (43.7 / 25.2 / 25.4): the codebook, not the convolution, sets the gradients' SQNR.
    iqs = {"gradient_clipping": "iqs"}
    for options, floors in ((per_tensor, (35.5, 34.5, 33.0)), (iqs, (36.0, 21.0, 21.0))):
        out, dx, dw, _ = gradq_step(conv, x, grad_out, options)
        measured = (sqnr_db(ref[0], out), sqnr_db(ref[1], dx), sqnr_db(ref[2], dw))
        assert all(m >= f for m, f in zip(measured, floors, strict=True)), (options, measured)


@pytest.mark.parametrize("lowering", ["triton", "fused"])
def test_dense_kernel_lowerings_on_cpu_are_the_reference(lowering):
    # On CPU tensors the kernels' launchers run their references: the same numbers.
    conv, x, grad_out = make_case("3x3_stride2_pad1_odd")
    reference = gradq_step(conv, x, grad_out, {"lowering": "reference"})
    torch._dynamo.reset()
    kernels = gradq_step(conv, x, grad_out, {"lowering": lowering})
    for got, want in zip(kernels, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_inductor_matches_gradq_eager():
    """The one conv test through Inductor: the same integers and scales as gradq_eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 4, stride=4),
        torch.nn.GELU(),
        torch.nn.Conv2d(32, 16, 1, stride=2),
        torch.nn.Conv2d(16, 8, 3, stride=2, padding=1),  # an implicit GEMM
    )
    x, grad_out = torch.randn(2, 3, 30, 29), torch.randn(2, 8, 2, 2)
    expected = compiled_step(model, x, grad_out)
    torch._dynamo.reset()
    actual = compiled_step(model, x, grad_out, backend=gradq_backend)
    # Inductor may fuse the float math around the GEMMs differently, moving a value across a
    # rounding boundary now and then.
    assert sqnr_db(expected[0], actual[0]) > 50 and sqnr_db(expected[1], actual[1]) > 50
    for name, grad in expected[2].items():
        assert sqnr_db(grad, actual[2][name]) > 50, name


@pytest.mark.parametrize("bits", [2, 4, 7])
def test_dense_conv_below_8_bits_equals_the_conv_of_its_codes(bits):
    # Below 8 bits the convolution is fake-quantized (float convolution of the dequantized
    # operands); it must equal the exact convolution of the integer codes, scaled, in float64.
    from gradq_fx import quantizer
    from gradq_fx.config import QuantSpec

    torch.manual_seed(bits)
    x, w = torch.randn(2, 5, 9, 7), torch.randn(6, 5, 3, 3)
    x[0, :, 4, 3] = 40.0  # an outlier pixel
    spec = QuantSpec(bits=bits)
    out = quantizer.quantized_conv2d(x, w, None, (2, 2), (1, 1), spec, spec)
    x_q, x_scale = quantizer.quantize_slices(x, spec, keep=0)
    w_q, w_scale = quantizer.quantize_slices(w, spec, keep=0)
    assert x_q.abs().max() <= spec.qmax and w_q.abs().max() <= spec.qmax
    codes = F.conv2d(x_q.double(), w_q.double(), None, 2, 1)
    expected = codes * x_scale.double()[:, None, None, None] * w_scale.double()[None, :, None, None]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
