"""Per-layer gradient statistics and the adaptive learning rate, against direct computations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gradq_fx import quantizer, stats, targets
from gradq_fx.config import GradQConfig, Granularity
from gradq_fx.lowerings.triton import TRITON
from gradq_fx.passes.rewrite import site_for
from tests.conftest import tiny_model


def direct_stats(g: torch.Tensor, restored: torch.Tensor) -> tuple[float, float]:
    g, r = g.double(), restored.double()
    cosine = (g * r).sum() / (g.norm() * r.norm())
    return cosine.item(), ((g - r).square().sum() / g.square().sum()).item()


def test_quantization_stats_match_direct_formulas():
    torch.manual_seed(0)
    g = torch.randn(197, 37) * torch.rand(197, 37).pow(6)
    spec = GradQConfig().gradient
    cosine, error, one = quantizer.quantization_stats(g, spec, dim=-2).tolist()
    expected = direct_stats(g, quantizer.dequantize(*quantizer.quantize(g, spec, dim=-2)))
    assert cosine == pytest.approx(expected[0], abs=1e-6)
    assert error == pytest.approx(expected[1], rel=1e-4)
    assert one == 1.0
    assert 0.99 < cosine < 1.0 and 0 < error < 0.02
    zero = quantizer.quantization_stats(torch.zeros(5, 3), spec, dim=-2).tolist()
    assert zero == [1.0, 0.0, 1.0]


def test_probe_gradient_is_the_wgrad_gradient_statistics():
    torch.manual_seed(1)
    config = GradQConfig()
    site = site_for("fc", config, right_is_weight=True)
    x = torch.randn(3, 197, 37)
    weight = torch.randn(11, 37, requires_grad=True)
    probe = torch.zeros(3, requires_grad=True)
    out = targets.gradq_linear(x, weight, None, site, probe)
    captured = []
    out.register_hook(captured.append)
    (out.square().sum() * 0.5).backward()

    grad_out = captured[0].reshape(-1, 11)  # dY as the wgrad GEMM sees it: [M, N]
    restored = quantizer.dequantize(*quantizer.quantize(grad_out, config.gradient, dim=-2))
    cosine, error = direct_stats(grad_out, restored)
    assert probe.grad.tolist() == pytest.approx([cosine, error, 1.0], rel=1e-4, abs=1e-6)


def test_stats_of_a_compiled_model_cover_every_linear_and_accumulate():
    model, size = tiny_model("deit_tiny_patch16_224")
    compiled = torch.compile(model, backend="gradq_eager", options={"stats": True})
    x = torch.randn(2, 3, size, size)
    for _ in range(2):
        compiled(x).square().mean().backward()
    found = stats.stats(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(found) == linears | {"patch_embed.proj"}  # the patch embedding is a GEMM too
    for layer in found.values():
        assert layer.steps.item() == 2.0
        assert 0.99 < layer.cosine.item() <= 1.0
        assert 0 <= layer.relative_error.item() < 0.02
    stats.reset_stats(model)
    assert stats.stats(model) == {}


@pytest.mark.parametrize("dim", [-1, -2])
@pytest.mark.parametrize("granularity", ["per_row", "per_tensor"])
def test_kernel_clip_stats_equal_the_reference_on_cpu(dim, granularity):
    # The triton lowering takes per-row iqr clips from kernels/iqr.py, whose CPU path is the
    # reference's clip_value: the same numbers, and the same as the direct formulas.
    torch.manual_seed(2)
    g = torch.randn(53, 197) * torch.rand(53, 197).pow(6)
    g[3] = 0.0  # an all-zero row
    spec = dataclasses.replace(GradQConfig().gradient, granularity=Granularity(granularity))
    expected = quantizer.quantization_stats(g, spec, dim)
    assert torch.equal(TRITON.stats(g, spec, dim), expected)
    assert torch.equal(torch.ops.gradq.quantization_stats(g, spec.encode(), dim, "fc"), expected)
    cosine, error = direct_stats(g, quantizer.simulate(g, spec, dim))
    assert expected.tolist() == pytest.approx([cosine, error, 1.0], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("lowering", ["triton", "fused"])
def test_kernel_lowerings_record_the_reference_statistics(lowering):
    def recorded(options):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),  # an implicit GEMM: the convolution's probe
            torch.nn.Flatten(2),
            torch.nn.Linear(25, 11),
        )
        compiled = torch.compile(model, backend="gradq_eager", options=options)
        compiled(torch.randn(2, 3, 5, 5)).square().mean().backward()
        return {name: layer.cosine for name, layer in stats.stats(model).items()}

    expected = recorded({"lowering": "reference", "stats": True})
    assert set(expected) == {"0", "2"}
    actual = recorded({"lowering": lowering, "stats": True})
    assert actual.keys() == expected.keys()
    for name, cosine in expected.items():
        assert torch.equal(actual[name], cosine), name


@pytest.mark.slow
@pytest.mark.parametrize("lowering", ["triton", "fused"])
def test_statistics_share_the_wgrads_iqr_clip_in_inductors_code(lowering):
    """The probe quantizes the same dY^T rows as the wgrad GEMM: the partitioner's CSE keeps
    one IQR clip for both, so the statistics cost no second clip."""
    from torch._inductor.utils import run_and_get_code

    def clips(with_stats: bool) -> int:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(13, 17), torch.nn.GELU(), torch.nn.Linear(17, 5)
        )
        x = torch.randn(7, 13, requires_grad=True)
        options = {"lowering": lowering, "stats": with_stats}
        compiled = torch.compile(model, backend="gradq", options=options)
        _, codes = run_and_get_code(lambda: compiled(x).sum().backward())
        assert set(stats.stats(model)) == ({"0", "2"} if with_stats else set())
        return "\n".join(codes).count("gradq.iqr_clip_rows.default(")

    without = clips(with_stats=False)
    assert without > 0  # the gradients' per-row iqr clips run as gradq's kernel
    assert clips(with_stats=True) == without


def test_no_probes_without_stats_or_wgrad():
    for options in ({"stats": False}, {"wgrad": False}):
        torch._dynamo.reset()
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
        torch.compile(model, backend="gradq_eager", options=options)(
            torch.randn(4, 8)
        ).sum().backward()
        assert stats.stats(model) == {}
        assert all(stats.probe_of(p) is None for p in model.parameters())


@pytest.mark.parametrize("cosine", [1.0, 0.999, 0.99, 0.95, 0.5, 0.0])
def test_factor_follows_the_rule(cosine):
    adaptive = stats.AdaptiveLR(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
    expected = max(math.exp(-20.0 * (1.0 - cosine)), 0.1)
    factor = adaptive.factor(torch.tensor(cosine, dtype=torch.float64)).item()
    assert factor == pytest.approx(expected, rel=1e-12)


def test_step_scales_each_group_and_restores_its_lr():
    quantized = torch.nn.Parameter(torch.ones(4))
    other = torch.nn.Parameter(torch.ones(4))
    probe = torch.nn.Parameter(torch.zeros(3))
    setattr(quantized, stats.PROBE_ATTRIBUTE, probe)
    optimizer = torch.optim.SGD([{"params": [quantized]}, {"params": [other]}], lr=0.5)
    adaptive = stats.AdaptiveLR(optimizer, alpha=20.0, floor=0.1)

    quantized.grad, other.grad = torch.ones(4), torch.ones(4)
    probe.grad = torch.tensor([1.98, 0.02, 2.0])  # two backward passes, mean cosine 0.99
    adaptive.step()

    factor = math.exp(-20.0 * 0.01)
    torch.testing.assert_close(quantized.detach(), torch.full((4,), 1 - 0.5 * factor))
    torch.testing.assert_close(other.detach(), torch.full((4,), 0.5))
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.5]  # restored, floats
    assert probe.grad is None  # statistics consumed
    assert adaptive.factors[0].item() == pytest.approx(factor, rel=1e-6)


def test_bad_use_raises():
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    for p in (a, b):
        setattr(p, stats.PROBE_ATTRIBUTE, torch.nn.Parameter(torch.ones(3)))
        stats.probe_of(p).grad = torch.ones(3)
    adaptive = stats.AdaptiveLR(torch.optim.SGD([a, b], lr=0.1))
    with pytest.raises(ValueError, match="own parameter group"):
        adaptive.step()
    with pytest.raises(ValueError, match="alpha"):
        stats.AdaptiveLR(adaptive.optimizer, alpha=-1)
    with pytest.raises(ValueError, match="floor"):
        stats.AdaptiveLR(adaptive.optimizer, floor=0)


def test_the_scaler_and_the_optimizer_step_apply_it_and_a_skipped_step_does_not():
    weight = torch.nn.Parameter(torch.ones(4))
    probe = stats.new_probe(weight)
    optimizer = torch.optim.SGD([weight], lr=0.5)
    adaptive = stats.AdaptiveLR(optimizer)
    factor = math.exp(-20.0 * 0.01)
    weight.grad, probe.grad = torch.ones(4), torch.tensor([0.99, 0.0, 1.0])
    optimizer.step()  # the optimizer's own step: hooked
    torch.testing.assert_close(weight.detach(), torch.full((4,), 1 - 0.5 * factor))
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    scaler.scale(torch.ones(()))  # as a loss would be: grads are the scaled ones
    weight.grad, probe.grad = torch.full((4,), float("inf")), torch.tensor([0.5, 0.5, 1.0])
    before = weight.detach().clone()
    scaler.step(optimizer)  # an overflow: no step, no scaling, the statistics wait
    assert torch.equal(weight.detach(), before) and probe.grad is not None
    scaler.update()  # halves the scale: the next gradients arrive scaled by 0.5
    weight.grad = torch.full((4,), scaler.get_scale())
    probe.grad = torch.tensor([0.99, 0.0, 1.0])
    scaler.step(optimizer)
    torch.testing.assert_close(weight.detach(), before - 0.5 * factor)
    assert optimizer.param_groups[0]["lr"] == 0.5
    adaptive.remove()
    weight.grad, probe.grad = torch.ones(4), torch.tensor([0.5, 0.5, 1.0])
    optimizer.step()  # unhooked: the group's own lr
    torch.testing.assert_close(weight.detach(), before - 0.5 * factor - 0.5)


def test_adaptive_lr_without_statistics_says_how_to_get_them():
    model = torch.nn.Linear(8, 3)
    torch.compile(model, backend="gradq_eager")(torch.randn(4, 8)).sum().backward()  # stats off
    optimizer = torch.optim.SGD(stats.param_groups(model), lr=0.1)
    stats.AdaptiveLR(optimizer)
    with pytest.raises(ValueError, match="options=\\{'stats': True\\}"):
        optimizer.step()
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        stats.AdaptiveLR(model)


def test_statistics_never_accumulate_past_the_window(monkeypatch):
    monkeypatch.setattr(stats, "WINDOW", 3)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    compiled = torch.compile(model, backend="gradq_eager", options={"stats": True})
    cosines = []
    for _ in range(6):  # nothing resets them: a loop that never reads the statistics
        compiled(torch.randn(16, 8)).square().sum().backward()
        cosines.append(stats.stats(model)["0"].cosine.item())
    for layer in stats.stats(model).values():
        assert layer.steps.item() == pytest.approx(3.0)  # counted up to the window, no more
        assert 0.9 < layer.cosine.item() <= 1.0 and 0 <= layer.relative_error.item() < 0.1
    assert min(cosines) <= stats.stats(model)["0"].cosine.item() <= max(cosines)


def test_param_groups_put_each_linear_and_conv_alone():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), torch.nn.Flatten(), torch.nn.Linear(4, 4),
        torch.nn.LayerNorm(4), torch.nn.Linear(4, 2),
    )  # fmt: skip
    groups = stats.param_groups(model)
    assert [len(g["params"]) for g in groups] == [2, 2, 2, 2]
    firsts = [g["params"][0] for g in groups[:3]]
    assert all(p is m.weight for p, m in zip(firsts, (model[0], model[2], model[4]), strict=True))
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters()}
