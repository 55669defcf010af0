"""The backend end to end: registration, numerics against float, Inductor, caching, errors.

Numerics sweeps use `backend="gradq_eager"` (the same rewrite and lowering without Inductor's
code generation, seconds per model); the Inductor path is checked against it on small models.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import logging
import re

import pytest
import torch
from torch._dynamo.utils import counters

import gradq_fx
from gradq_fx.backend import gradq_backend, to_config
from gradq_fx.config import GradQConfig
from gradq_fx.passes import prepare
from gradq_fx.quantizer import sqnr_db
from gradq_fx.report import report as trace_report
from tests.conftest import tiny_model


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    # 37 and 11 are primes: no dimension a multiple of 8.
    return torch.nn.Sequential(torch.nn.Linear(37, 64), torch.nn.GELU(), torch.nn.Linear(64, 11))


def step(model, x, backend=None, options=None, **compile_kwargs):
    """Output, input gradient and parameter gradients of loss = mean(out^2)."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    run = model
    if backend is not None:
        run = torch.compile(model, backend=backend, options=options, **compile_kwargs)
    out = run(x)
    out.float().square().mean().backward()
    grads = {
        name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()
    }
    return out.detach(), x.grad.clone(), grads


def uniform_options(granularity: str, rounding: str) -> dict:
    return {
        f"{operand}_{field}": value
        for operand in ("weight", "activation", "gradient")
        for field, value in (("granularity", granularity), ("rounding", rounding))
    }


def min_weight_sqnr(reference: dict, actual: dict) -> float:
    return min(sqnr_db(reference[n], actual[n]) for n in reference if reference[n].dim() == 2)


# Floors in dB, (output, dX, min dW), set about 5 dB under what was measured on this
# machine (torch 2.14.1 CPU) for the worst granularity of each rounding mode:
# linear nearest 39/37/41.8, stochastic 36.2/34.0/39.0; MLP nearest 34.8/31.9/39.1,
# stochastic 31.5/28.3/35.6; tiny DeiT nearest 29.6/24.8/25.1, stochastic 24.9/21.9/21.7.
FLOORS = {
    ("linear", "nearest"): 32,
    ("linear", "stochastic"): 29,
    ("mlp", "nearest"): 27,
    ("mlp", "stochastic"): 24,
    ("deit", "nearest"): 20,
    ("deit", "stochastic"): 17,
}


def test_backend_is_registered_once_through_the_entry_point():
    entries = [
        e for e in importlib.metadata.entry_points(group="torch_dynamo_backends")
        if e.name == "gradq"
    ]  # fmt: skip
    assert len(entries) == 1
    assert entries[0].load() is gradq_backend
    assert torch._dynamo.lookup_backend("gradq") is gradq_backend
    assert "gradq" in torch._dynamo.list_backends()


SPECS = list(itertools.product(["per_tensor", "per_row"], ["nearest", "stochastic"]))


@pytest.mark.parametrize(("granularity", "rounding"), SPECS)
@pytest.mark.parametrize("model_name", ["linear", "mlp"])
def test_small_models_track_float(model_name, granularity, rounding):
    torch.manual_seed(0)
    model = torch.nn.Linear(37, 11) if model_name == "linear" else mlp()
    x = torch.randn(3, 197, 37)  # 197 tokens, as in a 224px ViT-B/16
    ref_out, ref_dx, ref_dw = step(model, x)
    torch.manual_seed(1)
    options = uniform_options(granularity, rounding)
    out, dx, dw = step(model, x, "gradq_eager", options, fullgraph=True)

    floor = FLOORS[(model_name, rounding)]
    assert sqnr_db(ref_out, out) > floor
    assert sqnr_db(ref_dx, dx) > floor
    assert min_weight_sqnr(ref_dw, dw) > floor
    # Quantization really happened: nothing equals the float result exactly.
    assert not torch.equal(ref_out, out)


@pytest.mark.parametrize(("granularity", "rounding"), SPECS)
def test_deit_tracks_float(granularity, rounding):
    model, size = tiny_model("deit_tiny_patch16_224")
    x = torch.randn(2, 3, size, size)
    ref_out, ref_dx, ref_dw = step(model, x)
    torch.manual_seed(1)
    options = uniform_options(granularity, rounding)
    out, dx, dw = step(model, x, "gradq_eager", options, fullgraph=True)

    floor = FLOORS[("deit", rounding)]
    assert sqnr_db(ref_out, out) > floor
    assert sqnr_db(ref_dx, dx) > floor
    assert min_weight_sqnr(ref_dw, dw) > floor


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "mobilevit_xxs"])
@pytest.mark.parametrize("attention", ["float", "int8"])
def test_swin_and_mobilevit_compile_fullgraph_and_track_float(name, attention):
    model, size = tiny_model(name)
    x = torch.randn(2, 3, size, size)
    ref_out, ref_dx, ref_dw = step(model, x)
    # MobileViT's linears and attention here; its convolutions in the test below.
    options = {"attention": attention, "convolutions": name != "mobilevit_xxs"}
    out, dx, dw = step(model, x, "gradq_eager", options, fullgraph=True)
    # Measured 34.9-42.5 dB (output), 31.2-46.0 (dX), 32.1-34.4 (worst dW) on these models.
    assert sqnr_db(ref_out, out) > 29
    assert sqnr_db(ref_dx, dx) > 26
    assert min_weight_sqnr(ref_dw, dw) > 26


@pytest.mark.slow
def test_mobilevit_with_int8_convolutions_compiles_and_tracks_float():
    model, size = tiny_model("mobilevit_xxs")
    x = torch.randn(2, 3, size, size)
    ref_out, ref_dx, ref_dw = step(model, x)
    out, dx, dw = step(model, x, "gradq_eager", None, fullgraph=True)
    # Measured 24.9 dB (output), 9.8 (dX), 7.9 (worst weight gradient, convolutions
    # included) with the dense 3x3 convolutions INT8 too (11.9 and 10.5 with them float).
    # Each convolution's own output is within 38.5-43.2 dB of float (test_conv.py), as good
    # as a Linear's; this freshly initialised MobileViT amplifies perturbations of its
    # convolutions' outputs: gaussian noise at 40 dB on one of them alone, in float, gives
    # 31.8 dB (output) and 20.7 dB (dX). Its linears are damped (80 dB from the same noise).
    assert sqnr_db(ref_out, out) > 20
    assert sqnr_db(ref_dx, dx) > 5
    assert min(sqnr_db(ref_dw[n], dw[n]) for n in ref_dw if ref_dw[n].dim() > 1) > 3


def test_bf16_autocast():
    model, x = mlp(), torch.randn(197, 37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref_dx, ref_dw = step(model, x)
        out, dx, dw = step(model, x, "gradq_eager", None, fullgraph=True)
    assert out.dtype == ref_out.dtype == torch.bfloat16
    assert dw["0.weight"].dtype == torch.float32
    # bf16 itself carries ~8 bits of mantissa: the floors are those of bf16 vs bf16.
    assert sqnr_db(ref_out, out) > 25
    assert min_weight_sqnr(ref_dw, dw) > 25


@pytest.mark.parametrize("backend", ["gradq_eager", pytest.param("gradq", marks=pytest.mark.slow)])
def test_weight_gradients_arrive_in_the_weights_layout(backend):
    # A gradient in another layout than its weight's makes autograd copy it into the weight's
    # after backward: a transposing copy per layer and step.
    model = mlp()
    layouts = {}
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: layouts.update({name: g.stride()}))
    step(model, torch.randn(3, 197, 37), backend, fullgraph=True)
    assert layouts == {name: p.stride() for name, p in model.named_parameters()}


def test_disabled_roles_compute_in_float():
    model, x = mlp(), torch.randn(197, 37)
    ref_out, ref_dx, ref_dw = step(model, x)
    options = {"forward": False, "dgrad": False, "wgrad": False}
    out, dx, dw = step(model, x, "gradq_eager", options)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(dx, ref_dx)
    for name in ref_dw:
        torch.testing.assert_close(dw[name], ref_dw[name])


def test_bad_options_raise_clear_errors():
    model, x = mlp(), torch.randn(5, 37)
    with pytest.raises(ValueError, match="unknown gradq option.*'bogus'"):
        gradq_fx.compile(model, {"bogus": 1})
    with pytest.raises(ValueError, match="weight_bits"):
        gradq_fx.compile(model, {"weight_bits": 9})
    with pytest.raises(ValueError, match="options must be a dict"):
        gradq_fx.compile(model, "int8")
    # Through torch.compile the error surfaces at the first call, wrapped by Dynamo.
    with pytest.raises(Exception, match="option 'gradient_rounding' must be one of"):
        torch.compile(model, backend="gradq", options={"gradient_rounding": "up"})(x)


# --- scripts that can only name the backend ------------------------------------------------


def test_gradq_options_environment_applies_under_explicit_options(monkeypatch):
    monkeypatch.setenv("GRADQ_OPTIONS", '{"exclude": ["2"], "gradient_quantizer": "minmax"}')
    assert to_config(None) == GradQConfig.from_options(
        {"exclude": ["2"], "gradient_quantizer": "minmax"}
    )
    # Explicit options win, key by key; a GradQConfig is taken as it is.
    assert to_config({"exclude": []}).exclude == ()
    assert to_config({"exclude": []}).gradient.clipping.value == "minmax"
    assert to_config(GradQConfig()) == GradQConfig()
    # A compile without options sees them: the second Linear ("2") stays float.
    decisions = []

    def backend(gm, example_inputs):
        decisions.extend(prepare(gm, to_config(None)))
        return gm.forward

    torch.compile(mlp(), backend=backend)(torch.randn(3, 37))
    assert [d.quantize for d in decisions] == [True, False]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("{not json", "GRADQ_OPTIONS must be a JSON object"),
        ('["exclude"]', "GRADQ_OPTIONS must be a JSON object"),
        ('{"lowering": "fast"}', "GRADQ_OPTIONS: option 'lowering' must be one of"),
        ('{"bogus": 1}', "GRADQ_OPTIONS: unknown gradq option.*'bogus'"),
    ],
)
def test_bad_gradq_options_environment_raises_naming_the_variable(monkeypatch, value, match):
    monkeypatch.setenv("GRADQ_OPTIONS", value)
    with pytest.raises(ValueError, match=match):
        to_config({"stats": False})


def test_each_compiled_graph_logs_its_coverage_and_writes_its_report(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("GRADQ_REPORT", str(tmp_path))
    monkeypatch.setenv("GRADQ_OPTIONS", '{"exclude": ["2"]}')
    model, x = mlp(), torch.randn(197, 37)
    with caplog.at_level(logging.INFO, logger="gradq_fx"):
        step(model, x, "gradq_eager")
    (line,) = [r.getMessage() for r in caplog.records if "GEMMs rewritten" in r.getMessage()]
    # Linear 0's three GEMMs; Linear 2 excluded by GRADQ_OPTIONS.
    assert "graph 0/0 (training): 3 GEMMs rewritten (3 in INT8)" in line
    assert "lowering: reference" in line and "kept float by the options 3" in line
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # nothing unreachable
    text, data = (tmp_path / "gradq-0-0.txt").read_text(), (tmp_path / "gradq-0-0.json")
    report = json.loads(data.read_text())
    assert report["config"]["exclude"] == ["2"] and len(report["gemms"]) == 3
    assert {op["module"] for op in report["float_ops"]} == {"2"}
    assert "excluded by config (exclude pattern '2')" in text


def test_compiled_reports_hold_what_each_compile_rewrote():
    before = len(gradq_fx.compiled_reports())
    model, x = mlp(), torch.randn(197, 37)
    step(model, x, "gradq_eager", {"exclude": ["2"]})
    found = gradq_fx.compiled_reports()
    assert len(found) == before + 1
    # What a second trace of the model reports, without the trace.
    traced = trace_report(model, (x.requires_grad_(),), {"exclude": ["2"]}, training=True)
    assert found[-1].to_dict() == traced.to_dict()
    assert len(found[-1].gemms) == 3


# --- Inductor --------------------------------------------------------------------------------


@pytest.mark.slow
def test_inductor_matches_reference_dynamic_shapes_and_inference():
    model = mlp()
    # 197 tokens, then M = 5 <= 16 (a shape cuBLAS's int8 GEMM refuses).
    inputs = [torch.randn(rows, 37) for rows in (197, 5)]
    reference = torch.compile(model, backend="gradq_eager", dynamic=True, fullgraph=True)
    expected = [step(reference, x) for x in inputs]
    # gradq's rewrite and numerics specialise no size: one graph serves both. (Inductor's
    # own CPU GEMM templates may still recompile for small M; that is not asserted.)
    assert counters["stats"]["unique_graphs"] == 1

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="gradq", dynamic=True, fullgraph=True)
    for x, (expected_out, expected_dx, expected_dw) in zip(inputs, expected, strict=True):
        _, _, float_dw = step(model, x)
        out, dx, dw = step(compiled, x)
        # Inductor may fuse float math differently, moving a value across a rounding
        # boundary now and then; otherwise it computes the same integers and scales.
        assert sqnr_db(expected_out, out) > 50
        assert sqnr_db(expected_dx, dx) > 50
        assert min_weight_sqnr(expected_dw, dw) > 50
        assert min_weight_sqnr(float_dw, dw) > 27
    with torch.no_grad():
        x = torch.randn(197, 37)
        assert sqnr_db(model(x), compiled(x)) > 32


@pytest.mark.slow
def test_inductor_under_bf16_autocast():
    model, x = mlp(), torch.randn(197, 37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, _, ref_dw = step(model, x)
        out, _, dw = step(model, x, "gradq", None, fullgraph=True)
    assert out.dtype == torch.bfloat16 and dw["0.weight"].dtype == torch.float32
    assert sqnr_db(ref_out, out) > 25
    assert min_weight_sqnr(ref_dw, dw) > 25


@pytest.mark.slow
def test_option_change_recompiles_and_same_options_hit_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model, x = mlp(), torch.randn(197, 37)

    def compile_once(options):
        torch._dynamo.reset()
        counters.clear()
        with torch._inductor.config.patch(fx_graph_cache=True):
            out, _, _ = step(model, x, "gradq", options)
        return out, counters["inductor"]["fxgraph_cache_hit"]

    first, hits = compile_once({})
    assert hits == 0
    reports = len(gradq_fx.compiled_reports())
    again, hits = compile_once({})
    assert hits == 2  # forward and backward graphs
    # AOTAutograd's cache passes gradq's graphs by, so gradq's passes ran before Inductor's
    # cache was asked: the hit still has its report.
    assert counters["aot_autograd"]["autograd_cache_hit"] == 0
    assert len(gradq_fx.compiled_reports()) == reports + 1
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    changed, hits = compile_once({"forward": False})
    assert hits == 0
    torch.testing.assert_close(changed, model(x).detach())


@pytest.mark.slow
def test_deit_training_with_inductor_tracks_float_and_learns():
    """A few AdamW steps: gradq's loss stays near eager float training's, and goes down."""
    model, size = tiny_model("deit_tiny_patch16_224", depth=1)
    float_model, _ = tiny_model("deit_tiny_patch16_224", depth=1)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
    compiled = torch.compile(model, backend="gradq", fullgraph=True)

    losses = {}
    for name, net, params in (
        ("float", float_model, float_model.parameters()),
        ("gradq", compiled, model.parameters()),
    ):
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        losses[name] = []
        for _ in range(6):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())

    # Measured (torch 2.14.1, CPU; the patch embedding in INT8 too): float 2.518, 0.938,
    # 0.370, 0.234, 0.186, 0.158 and gradq 2.519, 0.938, 0.370, 0.233, 0.186, 0.158: at most
    # 0.4% apart at any step.
    for float_loss, gradq_loss in zip(losses["float"], losses["gradq"], strict=True):
        assert abs(float_loss - gradq_loss) < 0.03 * float_loss + 0.005
    assert losses["gradq"][-1] < 0.5 * losses["gradq"][0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_shapes_cublas_refuses():
    model = mlp().cuda()
    for rows in (5, 197):  # M <= 16, then K = 37 and N = 11 (not multiples of 8)
        x = torch.randn(rows, 37, device="cuda")
        ref_out, ref_dx, ref_dw = step(model, x)
        # fallback never: so small a GEMM may well run faster in float, and fall back.
        out, dx, dw = step(model, x, "gradq", {"fallback": "never"})
        assert sqnr_db(ref_out, out) > 27
        assert sqnr_db(ref_dx, dx) > 27
        assert min_weight_sqnr(ref_dw, dw) > 27


@pytest.mark.slow
@pytest.mark.parametrize("lowering", ["triton", "fused"])
def test_inductor_compiles_the_kernel_lowerings(lowering):
    """The kernels' custom ops inside Inductor's code: the same numbers as the reference."""
    model, x = mlp(), torch.randn(197, 37)
    expected = step(model, x, "gradq_eager", {"lowering": "reference"}, fullgraph=True)
    torch._dynamo.reset()
    from torch._inductor.utils import run_and_get_code

    actual, codes = run_and_get_code(
        step, model, x, "gradq", {"lowering": lowering}, fullgraph=True
    )
    code = "\n".join(codes)
    assert "gradq.int8_scaled_mm" in code
    # fused: Inductor's own code quantizes (the quantize kernel is absent).
    assert ("gradq.quantize_rows" in code) == (lowering == "triton")
    # Same integers and scales; Inductor may fuse the surrounding float math differently.
    assert sqnr_db(expected[0], actual[0]) > 50
    assert sqnr_db(expected[1], actual[1]) > 50
    assert min_weight_sqnr(expected[2], actual[2]) > 50


@pytest.mark.slow
def test_fused_lowering_quantizes_inside_the_producers_kernel():
    """LayerNorm -> Linear: `fused` leaves Inductor one kernel (LayerNorm and the quantize of
    both operands) before gradq's GEMM; `triton` launches the quantize kernel on its output."""
    from torch._inductor.utils import run_and_get_code

    model = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 32))
    x = torch.randn(197, 64)
    kernels = {}
    for lowering in ("fused", "triton"):
        torch._dynamo.reset()
        with torch.no_grad():
            compiled = torch.compile(model, backend="gradq", options={"lowering": lowering})
            _, codes = run_and_get_code(compiled, x)
        code = "\n".join(codes)
        assert "gradq.int8_scaled_mm" in code
        kernels[lowering] = sorted(set(re.findall(r"cpp_fused_\w+", code)))
        assert ("gradq.quantize_rows" in code) == (lowering == "triton")
    (fused,) = kernels["fused"]
    assert "layer_norm" in fused


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("lowering", ["auto", "fused", "inductor_template"])
def test_cuda_lowerings_generate_int8_kernels_and_track_float(lowering):
    from torch._inductor.utils import run_and_get_code

    model = mlp().cuda()
    x = torch.randn(197, 37, device="cuda")
    ref_out, ref_dx, ref_dw = step(model, x)
    options = {"lowering": lowering, "fallback": "never"}  # INT8 even where float is faster
    (out, dx, dw), codes = run_and_get_code(step, model, x, "gradq", options)
    code = "\n".join(codes)
    if lowering == "auto":  # gradq's fused kernels, launched from Inductor's code
        assert "gradq.int8_scaled_mm" in code and "gradq.quantize_rows" in code
    elif lowering == "fused":  # gradq's GEMM; Inductor's Triton kernels quantize
        assert "gradq.int8_scaled_mm" in code and "gradq.quantize_rows" not in code
        assert "tl.int8" in code
    else:  # Inductor's own int8 GEMM template, no gradq kernel
        assert "gradq." not in code and "triton" in code
    assert sqnr_db(ref_out, out) > 27
    assert sqnr_db(ref_dx, dx) > 27
    assert min_weight_sqnr(ref_dw, dw) > 27
