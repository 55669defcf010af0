"""fallback: what is timed, when it is measured, and what a GEMM that falls back becomes.

The speed rule itself needs a GPU (tests marked `gpu`); on the CPU `speedup` is replaced by a
stub, and the GEMMs it condemns must compute exactly what the float model computes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from gradq_fx import fallback, stats
from gradq_fx.config import QuantSpec
from gradq_fx.lowerings import reference
from gradq_fx.lowerings.fused import FUSED
from gradq_fx.lowerings.triton import TRITON
from gradq_fx.passes import lower
from gradq_fx.report import report

GEMM = torch.ops.gradq.mm.default
ACTIVATION = QuantSpec().encode()


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.GELU(), torch.nn.Linear(17, 5))


def train_step(model, x, options):
    """Output and every gradient of loss = sum(out * probe), through gradq_eager."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    torch._dynamo.reset()
    out = torch.compile(model, backend="gradq_eager", options=options, fullgraph=True)(x)
    probe = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * probe).sum().backward()
    return [out.detach(), x.grad.clone(), *(p.grad.clone() for p in model.parameters())]


def mm_arguments(a, b, bias=None) -> dict:
    return {
        "a": a, "b": b, "bias": bias, "a_spec": ACTIVATION, "b_spec": ACTIVATION,
        "role": "forward", "operands": "AW", "module": "fc",
    }  # fmt: skip


@pytest.fixture
def slow_first_layer(monkeypatch):
    """Every GEMM of module "0" measures at half the float speed, the others at twice."""
    calls = []

    def speedup(lowering, target, arguments):
        calls.append((target, arguments["module"], arguments["role"]))
        return 0.5 if arguments["module"] == "0" else 2.0

    monkeypatch.setattr(fallback, "speedup", speedup)
    return calls


# --- what is timed ---------------------------------------------------------------------------


def test_materialise_keeps_shape_strides_and_dtype():
    with FakeTensorMode():
        base = torch.empty(29, 37, dtype=torch.bfloat16)
        fakes = [base, base.t(), torch.empty(1, 37).expand(5, 37), torch.empty(0, 3)]
    for fake in fakes:
        real = fallback._materialise(fake)
        assert not isinstance(real, torch._subclasses.FakeTensor)
        assert (real.shape, real.stride(), real.dtype) == (fake.shape, fake.stride(), fake.dtype)
    assert fallback._materialise("8:per_row") == "8:per_row"


@pytest.mark.parametrize("lowering", [TRITON, FUSED], ids=["triton", "fused"])
def test_paths_compute_the_int8_gemm_and_the_float_gemm(lowering, monkeypatch):
    a, b, bias = torch.randn(7, 13), torch.randn(5, 13).t(), torch.randn(5)
    arguments = mm_arguments(a, b, bias)
    ran = []
    monkeypatch.setattr(lowering, "quantize_rows", _recording(lowering.quantize_rows, ran))
    int8, floating = fallback._paths(lowering, GEMM, arguments)
    expected = reference.run_mm(a, b, bias, ACTIVATION, ACTIVATION)
    assert torch.equal(int8(), expected)  # on the CPU the kernels run their references
    assert len(ran) == 2  # the path timed is the lowering's: it quantized both operands
    torch.testing.assert_close(floating(), a @ b + bias, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="target must be gradq.mm or gradq.conv2d"):
        fallback._paths(lowering, torch.ops.aten.mm.default, arguments)


def _recording(fn, calls: list):
    def recorded(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)

    return recorded


def test_conv_paths_compute_the_int8_and_the_float_convolution():
    x, w, bias = torch.randn(2, 3, 11, 9), torch.randn(5, 3, 3, 3), torch.randn(5)
    conv = {"a": x, "b": w, "bias": bias, "stride": [2, 2], "padding": [1, 1], "size": [6, 5]}
    specs = {"a_spec": ACTIVATION, "b_spec": ACTIVATION, "role": "forward", "module": "c"}
    int8, floating = fallback._paths(TRITON, torch.ops.gradq.conv2d.default, {**conv, **specs})
    expected = reference.run_conv2d(*conv.values(), ACTIVATION, ACTIVATION, "forward")
    assert torch.equal(int8(), expected)
    want = torch.nn.functional.conv2d(x, w, bias, stride=2, padding=1)
    torch.testing.assert_close(floating(), want, rtol=1e-5, atol=1e-5)


def test_measure_returns_a_ratio_of_times():
    ratio = fallback.measure(TRITON, GEMM, mm_arguments(torch.randn(31, 17), torch.randn(17, 11)))
    assert ratio > 0 and math.isfinite(ratio)


# --- when it is measured ---------------------------------------------------------------------


def test_speedup_measures_cuda_gemms_once_per_signature(monkeypatch):
    measured = []
    monkeypatch.setattr(fallback, "_MEASURED", {})
    monkeypatch.setattr(fallback, "measure", lambda lo, t, args: measured.append(args) or 0.8)
    with FakeTensorMode():  # fake CUDA tensors need no GPU
        a, b = torch.empty(197, 64, device="cuda"), torch.empty(64, 32, device="cuda")
        cpu = torch.empty(197, 64)
    assert fallback.speedup(TRITON, GEMM, mm_arguments(a, b)) == 0.8
    # Another module with the same GEMM: no new measurement.
    assert fallback.speedup(TRITON, GEMM, {**mm_arguments(a, b), "module": "other"}) == 0.8
    assert len(measured) == 1
    (first,) = fallback.measurements()
    assert (first.op, first.role, first.a_shape, first.b_shape) == (
        "gradq.mm",
        "forward",
        "197x64",
        "64x32",
    )
    assert (first.dtype, first.speedup) == ("float32", 0.8)
    fallback.speedup(TRITON, GEMM, mm_arguments(a, b.t().contiguous().t()))  # another layout
    assert len(measured) == 2
    # The CPU is never measured.
    assert fallback.speedup(TRITON, GEMM, mm_arguments(cpu, b)) is None
    assert len(measured) == 2
    fallback.reset()
    assert fallback.measurements() == []


def test_symbolic_shapes_are_not_measured(monkeypatch):
    monkeypatch.setattr(fallback, "measure", lambda lo, t, args: pytest.fail("measured"))
    env = ShapeEnv()
    with FakeTensorMode(shape_env=env):
        tokens = env.create_unbacked_symint()  # dynamic=True: the token count is a symbol
        a, b = torch.empty(tokens, 64, device="cuda"), torch.empty(64, 32, device="cuda")
    assert fallback.speedup(TRITON, GEMM, mm_arguments(a, b)) is None


# --- what falls back -------------------------------------------------------------------------


@pytest.mark.parametrize("lowering", ["triton", "fused"])
def test_slow_gemms_become_the_float_gemms_they_replace(slow_first_layer, lowering):
    model, x = mlp(), torch.randn(7, 13)
    options = {"lowering": lowering}
    actual = train_step(model, x, options)
    # Layer "0" in float (excluded from the rewrite: eager autograd's own GEMMs), layer "2"
    # in INT8 as the rewrite makes it: the same numbers up to the float GEMMs' summation order.
    expected = train_step(model, x, {**options, "exclude": ["0"], "fallback": "never"})
    for want, got in zip(expected, actual, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    int8 = train_step(model, x, {**options, "fallback": "never"})
    assert not torch.equal(int8[2], actual[2])  # layer "0"'s weight gradient moved
    asked = {(module, role) for _, module, role in slow_first_layer}
    assert asked >= {("0", "forward"), ("0", "wgrad"), ("2", "forward"), ("2", "dgrad")}


def test_a_fallen_back_wgrad_records_exact_statistics(slow_first_layer):
    # Layer "0"'s wgrad runs in float: its gradient is used as it is (cosine 1, error 0), and
    # the adaptive learning rate leaves the layer alone. Layer "2" records its quantization's.
    model = mlp()
    train_step(model, torch.randn(7, 13), {"lowering": "triton", "stats": True})
    recorded = stats.stats(model)
    assert (recorded["0"].cosine.item(), recorded["0"].relative_error.item()) == (1.0, 0.0)
    assert 0.9 < recorded["2"].cosine.item() < 1.0 and recorded["2"].relative_error.item() > 0


def test_lowered_graph_keeps_int8_kernels_for_the_fast_gemms(slow_first_layer):
    from gradq_fx.config import Fallback, GradQConfig, Lowering
    from gradq_fx.report import capture

    x = torch.randn(7, 13, requires_grad=True)
    (captured,) = capture(mlp(), (x,), GradQConfig(), training=True)
    graph = captured.graph.graph
    fake_mode = torch._guards.detect_fake_mode([n.meta.get("val") for n in graph.nodes])
    with fake_mode:
        lower.run(graph, Lowering.TRITON, Fallback.SLOWER)
    kernels = [n for n in graph.nodes if n.target is torch.ops.gradq.int8_scaled_mm.default]
    assert len(kernels) == 3  # layer "2": forward, dgrad, wgrad


def test_never_asks_for_no_measurement(monkeypatch):
    monkeypatch.setattr(fallback, "speedup", lambda lo, t, a: pytest.fail("measured"))
    result = report(mlp(), torch.randn(7, 13), {"lowering": "triton", "fallback": "never"})
    assert all(row.lowering == "triton" for row in result.gemms)


def test_report_names_each_fallback_with_its_ratio_and_reason(slow_first_layer):
    model = mlp()
    result = report(model, torch.randn(7, 13, requires_grad=True), {"lowering": "triton"})
    by_module = {}
    for row in result.gemms:
        by_module.setdefault(row.module, set()).add(row.lowering)
    assert by_module == {"0": {"float fallback (INT8 0.50x)"}, "2": {"triton"}}
    reasons = {op.reason for op in result.float_ops if op.module == "0"}
    assert len(reasons) == 1 and "measured slower than the float GEMM" in reasons.pop()
    assert {row.module for row in result.int8_gemms} == {"2"}


# --- on a GPU --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_speedup_is_measured_and_the_report_agrees_with_it():
    a = torch.randn(197, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16).t()
    ratio = fallback.speedup(TRITON, GEMM, mm_arguments(a, b))
    assert ratio is not None and ratio > 0 and math.isfinite(ratio)
    model = mlp().cuda()
    result = report(model, torch.randn(197, 13, device="cuda"), {"lowering": "triton"})
    for row in result.gemms:
        assert row.lowering == "triton" or row.lowering.startswith("float fallback (INT8 0.")


@pytest.mark.slow
def test_measuring_inside_inductors_joint_pass(monkeypatch):
    """Inductor runs the lowering under its fake mode: measure() must time real tensors there.

    On the CPU `speedup` never measures; here it is made to, and then to condemn module "0",
    so that Inductor's code holds gradq's INT8 kernel for layer "2" only.
    """
    measured = {}

    def speedup(lowering, target, arguments):
        gemm = (arguments["module"], arguments["role"])
        measured[gemm] = fallback.measure(lowering, target, arguments)
        return 0.5 if arguments["module"] == "0" else 2.0

    monkeypatch.setattr(fallback, "speedup", speedup)
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model, x = mlp(), torch.randn(7, 13, requires_grad=True)
    compiled = torch.compile(model, backend="gradq", options={"lowering": "triton"})
    _, codes = run_and_get_code(lambda: compiled(x).sum().backward())
    assert len(measured) == 6  # 2 layers x (forward, dgrad, wgrad)
    assert all(r > 0 and math.isfinite(r) for r in measured.values())
    code = "\n".join(codes)
    assert code.count("gradq.int8_scaled_mm.default(") == 3  # layer "2": forward, dgrad, wgrad
