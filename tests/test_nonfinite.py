"""NaN and Inf behave as in float: wherever float's result is non-finite, gradq's is too.

The reference is eager float: the same module run without gradq, and its non-finite outputs
and gradients counted. gradq may make more values non-finite (a NaN scale covers its whole
row, column or tensor), never fewer. fp16 loss scaling relies on exactly this:
`torch.amp.GradScaler` skips a step and lowers its scale when it finds a NaN or an Inf in a
gradient, and the test checks that it does so under gradq as it does in float.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import gradq_fx
from gradq_fx import quantizer
from gradq_fx.config import Clipping, Granularity, QuantSpec, Rounding

BAD = [float("nan"), float("inf"), float("-inf")]
# The options sweep: each clipping, both granularities, both roundings, simulated IQS and a
# sub-8-bit fake-quantized forward.
OPTIONS = {
    "defaults": {},
    "minmax": {"gradient_clipping": "minmax", "gradient_scaling": False},
    "iqs": {"gradient_clipping": "iqs"},
    "iqr_activations": {"activation_clipping": "iqr"},
    "per_tensor": {
        "weight_granularity": "per_tensor",
        "activation_granularity": "per_tensor",
        "gradient_granularity": "per_tensor",
    },
    "stochastic": {"gradient_rounding": "stochastic", "activation_rounding": "stochastic"},
    "w4a4": {"weight_bits": 4, "activation_bits": 4},
    "int8_attention": {"attention": "int8"},
}
LOWERINGS = ["reference", "triton", "fused"]


def nonfinite(tensor: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(tensor)


class Net(torch.nn.Module):
    """A bias-free MLP (Linear width -> width, GELU, Linear width -> width // 4) with a tiny
    attention over its rows in between, so that attention='int8' has GEMMs to quantize."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.fc1 = torch.nn.Linear(width, width, bias=False)
        self.fc2 = torch.nn.Linear(width, width // 4, bias=False)

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        q = h.view(-1, 8, h.shape[-1])
        h = h + F.scaled_dot_product_attention(q, q, q).reshape(h.shape)
        return self.fc2(h)


def run(model, x, grad_out):
    """Non-finite masks of the output and of every parameter gradient of one step."""
    model.zero_grad()
    out = model(x)
    out.backward(grad_out)
    grads = {
        name.removeprefix("_orig_mod."): nonfinite(p.grad) for name, p in model.named_parameters()
    }
    return nonfinite(out), grads


def inputs(bad_input: float | None, bad_grad: float | None, width: int = 64):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, width, generator=gen)
    grad_out = torch.randn(32, width // 4, generator=gen)
    if bad_input is not None:
        x[3, 5] = bad_input
    if bad_grad is not None:
        grad_out[7, 2] = bad_grad
    return x, grad_out


def assert_covers(gradq, float_, where: str):
    missing = (float_ & ~gradq).sum().item()
    assert missing == 0, f"{where}: {missing} values non-finite in float are finite under gradq"


EVERY_CASE = [case for bad in BAD for case in ((bad, None), (None, bad))]
# Under the interpreter, which is slow: a NaN input and an Inf gradient.
FEW_CASES = [(float("nan"), None), (None, float("inf"))]


def check(model, compiled, make_inputs, cases=EVERY_CASE):
    """For each (bad input, bad output gradient) case: every value float makes non-finite,
    gradq makes non-finite too (one compile: only the values change)."""
    for case in cases:
        x, grad_out = make_inputs(*case)
        float_out, float_grads = run(model, x, grad_out)
        assert float_out.any() or any(g.any() for g in float_grads.values())  # the case bites
        out, grads = run(compiled, x, grad_out)
        where = f"input {case[0]}" if case[0] is not None else f"gradient {case[1]}"
        assert_covers(out, float_out, f"{where}: output")
        for name, mask in float_grads.items():
            assert_covers(grads[name], mask, f"{where}: {name}.grad")


def check_net(options: dict, width: int = 64, cases=EVERY_CASE):
    torch.manual_seed(0)
    model = Net(width)
    compiled = torch.compile(model, backend="gradq_eager", options=options)
    check(model, compiled, lambda *case: inputs(*case, width=width), cases)


# Every option with the reference lowering; the defaults with each lowering (on CPU tensors
# the kernel lowerings run their references in their own graph structure).
SWEEP = [(name, "reference") for name in sorted(OPTIONS)]
SWEEP += [("defaults", lowering) for lowering in LOWERINGS if lowering != "reference"]


@pytest.mark.parametrize(("name", "lowering"), SWEEP)
def test_a_bad_input_or_gradient_stays_non_finite(name, lowering):
    check_net({**OPTIONS[name], "lowering": lowering})


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("name", "lowering"),
    [("defaults", "triton"), ("int8_attention", "triton"), ("per_tensor", "fused")],
)
def test_the_kernels_keep_a_bad_value_non_finite(name, lowering):
    """The same through gradq's Triton kernels (in the interpreter, on CPU tensors; each
    kernel's own handling of NaN and Inf is tested in tests/kernels)."""
    check_net({**OPTIONS[name], "lowering": lowering}, width=16, cases=FEW_CASES)


class ConvNet(torch.nn.Module):
    """A 1x1 convolution (a GEMM) and a padded 3x3 one (an implicit GEMM), as in MobileViT."""

    def __init__(self):
        super().__init__()
        self.pointwise = torch.nn.Conv2d(3, 8, 1)
        self.spatial = torch.nn.Conv2d(8, 5, 3, padding=1, stride=2)

    def forward(self, x):
        return self.spatial(F.gelu(self.pointwise(x)))


def conv_inputs(bad_input: float | None, bad_grad: float | None):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 11, 13, generator=gen)
    grad_out = torch.randn(2, 5, 6, 7, generator=gen)
    if bad_input is not None:
        x[1, 2, 4, 6] = bad_input
    if bad_grad is not None:
        grad_out[0, 3, 2, 5] = bad_grad
    return x, grad_out


def check_conv(options: dict, cases=EVERY_CASE):
    torch.manual_seed(0)
    model = ConvNet()
    compiled = torch.compile(model, backend="gradq_eager", options=options)
    check(model, compiled, conv_inputs, cases)


CONV_SWEEP = [(name, "reference") for name in ("defaults", "per_tensor", "iqs", "w4a4")]
CONV_SWEEP += [("defaults", lowering) for lowering in LOWERINGS if lowering != "reference"]


@pytest.mark.parametrize(("name", "lowering"), CONV_SWEEP)
def test_convolutions_keep_a_bad_value_non_finite(name, lowering):
    check_conv({**OPTIONS[name], "lowering": lowering})


@pytest.mark.interpret
def test_the_convolution_kernels_keep_a_bad_value_non_finite():
    check_conv({"lowering": "triton"}, cases=FEW_CASES)


# -- the quantizer's own rule ----------------------------------------------------------------


@pytest.mark.parametrize("scaling", [False, True])
@pytest.mark.parametrize("rounding", list(Rounding), ids=lambda r: r.value)
@pytest.mark.parametrize("clipping", [Clipping.MINMAX, Clipping.IQR], ids=lambda c: c.value)
@pytest.mark.parametrize("bad", BAD, ids=str)
def test_a_slice_holding_a_bad_value_gets_a_nan_scale_and_zero_codes(
    bad, clipping, rounding, scaling
):
    x = torch.randn(6, 197)
    x[2, 100] = bad
    spec = QuantSpec(rounding=rounding, clipping=clipping, scaling=scaling)
    q, scale = quantizer.quantize(x, spec, dim=-1)
    assert torch.isnan(scale[2]).all() and (q[2] == 0).all()
    assert torch.isfinite(scale[[0, 1, 3, 4, 5]]).all()
    restored = quantizer.dequantize(q, scale)
    assert torch.isnan(restored[2]).all() and torch.isfinite(restored[[0, 1, 3, 4, 5]]).all()
    tensor = dataclasses.replace(spec, granularity=Granularity.PER_TENSOR)
    assert torch.isnan(quantizer.simulate(x, tensor, dim=-1)).all()


@pytest.mark.parametrize("bad", BAD, ids=str)
def test_iqs_rows_holding_a_bad_value_are_nan(bad):
    x = torch.randn(5, 64)
    x[1, 3] = bad
    restored = quantizer.simulate(x, QuantSpec(clipping=Clipping.IQS), dim=-1)
    assert torch.isnan(restored[1]).all() and torch.isfinite(restored[[0, 2, 3, 4]]).all()


@pytest.mark.parametrize("bad", BAD, ids=str)
def test_lsq_fake_quantization_passes_bad_values_both_ways(bad):
    x = torch.randn(4, 16, requires_grad=True)
    scale = torch.tensor(0.05, requires_grad=True)
    with torch.no_grad():
        x[1, 2] = bad
    out = gradq_fx.ops.lsq_node(x, scale, bits=4)
    assert nonfinite(out)[1, 2] and nonfinite(out).sum() == 1
    if not math.isnan(bad):  # an Inf stays the same Inf, as the float identity gives it
        assert out[1, 2] == bad
    grad = torch.zeros_like(out)
    grad[3, 7] = bad
    with torch.no_grad():
        x[1, 2] = 100.0  # clipped: LSQ's gradient to it is 0, but not for a bad gradient
        x[3, 7] = 100.0
    out = gradq_fx.ops.lsq_node(x, scale, bits=4)
    out.backward(grad)
    assert nonfinite(x.grad)[3, 7] and nonfinite(x.grad).sum() == 1
    assert nonfinite(scale.grad)


# -- fp16 loss scaling and the adaptive learning rate ----------------------------------------


def scaler_steps(model, backend, dtype, steps: int, options=None):
    """Train `steps` steps under autocast(dtype) with a GradScaler whose first scale (2^24)
    makes the first backward overflow float16, and whose back-off (2^-16) makes the next fit;
    return (scale after each step, parameters after each step)."""
    torch.manual_seed(0)
    run = model if backend is None else torch.compile(model, backend=backend, options=options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=2.0**24, backoff_factor=2.0**-16, growth_interval=1000
    )
    gen = torch.Generator().manual_seed(2)
    scales, params = [], []
    for _ in range(steps):
        x = torch.randn(32, 64, generator=gen)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = run(x).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
        params.append([p.detach().clone() for p in model.parameters()])
    return scales, params


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_fp16_grad_scaler_skips_the_overflowing_step_as_in_float(lowering):
    torch.manual_seed(0)
    float_model, gradq_model = Net(), Net()
    gradq_model.load_state_dict(float_model.state_dict())
    start = [p.detach().clone() for p in float_model.parameters()]
    float_scales, float_params = scaler_steps(float_model, None, torch.float16, 3)
    torch._dynamo.reset()
    options = {"lowering": lowering}
    gradq_scales, gradq_params = scaler_steps(gradq_model, "gradq_eager", torch.float16, 3, options)
    # Float overflows at 2^24 and steps at 2^8: the same skipped step, the same scales.
    assert float_scales == [2.0**8] * 3
    assert gradq_scales == float_scales
    # The skipped step left the parameters where they were; the next ones moved them.
    assert all(torch.equal(p, q) for p, q in zip(gradq_params[0], start, strict=True))
    assert not any(torch.equal(p, q) for p, q in zip(gradq_params[1], start, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(float_params[1], start, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_bf16_and_fp32_propagate_an_overflow_like_float(dtype):
    torch.manual_seed(0)
    model = Net()
    x, grad_out = inputs(None, float("inf"))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is torch.bfloat16):
        float_out, float_grads = run(model, x, grad_out)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="gradq_eager")
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is torch.bfloat16):
        _, grads = run(compiled, x, grad_out)
    assert any(mask.any() for mask in float_grads.values())
    for name, mask in float_grads.items():
        assert_covers(grads[name], mask, name)


def test_adaptive_lr_keeps_the_last_finite_factor_after_a_bad_step():
    torch.manual_seed(0)
    model = Net()
    compiled = torch.compile(model, backend="gradq_eager", options={"stats": True})
    x, grad_out = inputs(None, None)
    compiled(x).backward(grad_out)  # the probes exist after the first backward
    optimizer = torch.optim.SGD(gradq_fx.param_groups(model), lr=0.1)
    adaptive = gradq_fx.AdaptiveLR(optimizer)
    optimizer.step()
    good = {index: factor.clone() for index, factor in adaptive.factors.items()}
    assert good and all(0.1 <= f.item() <= 1.0 for f in good.values())
    optimizer.zero_grad()
    compiled(x).backward(inputs(None, float("nan"))[1])  # statistics of a NaN gradient
    optimizer.step()
    assert adaptive.factors.keys() == good.keys()
    for index, factor in adaptive.factors.items():
        assert torch.equal(factor, good[index])  # not NaN: the last finite one
    for group in optimizer.param_groups:
        assert group["lr"] == 0.1  # restored after the step
