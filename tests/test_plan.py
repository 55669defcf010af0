"""gradq_fx.plan: one typed plan per gradq op, read by the lowering pass and the report."""

from __future__ import annotations

import pytest
import torch

from gradq_fx import plan
from gradq_fx.config import Fallback, GradQConfig, Lowering, Operand, Role
from gradq_fx.plan import GemmKind
from gradq_fx.report import capture

A, W, G = Operand.ACTIVATION, Operand.WEIGHT, Operand.GRADIENT


def planned(options=None, lowering=Lowering.AUTO, rule=Fallback.NEVER):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.GELU(), torch.nn.Linear(17, 5))
    config = GradQConfig.from_options({"stats": True, **(options or {})})
    x = torch.randn(7, 13, requires_grad=True)
    (captured,) = capture(model, (x,), config, training=True)
    graph = captured.graph.graph
    plans = plan.run(graph, lowering, rule)
    return graph, plans


def gemms(plans, module="0"):
    return {p.role: p for p in plans if isinstance(p, plan.GemmPlan) and p.module == module}


def test_every_gradq_op_gets_a_plan_in_its_meta():
    graph, plans = planned()
    targets = (*plan.GEMM_OPS, plan.STATS_OP)
    nodes = [n for t in targets for n in graph.find_nodes(op="call_function", target=t)]
    assert len(nodes) == len(plans) == 2 * 3 + 2  # 2 layers x 3 GEMMs, 2 statistics
    assert all(plan.of(node) in plans for node in nodes)
    by_role = gemms(plans)
    assert by_role[Role.FORWARD].operands == (A, W)
    assert by_role[Role.DGRAD].operands == (G, W)
    assert by_role[Role.WGRAD].operands == (A, G)
    for gemm in by_role.values():
        assert gemm.kind is GemmKind.INT8 and gemm.lowering is Lowering.REFERENCE
        assert gemm.describe() == "reference" and gemm.speedup is None
    stats = [p for p in plans if isinstance(p, plan.StatsPlan)]
    assert sorted(s.module for s in stats) == ["0", "2"] and not any(s.exact for s in stats)


def test_fake_quantized_gemms_are_named_by_their_operands_widths():
    options = {"weight_bits": 4, "activation_bits": 4, "gradient_bits": 4}
    _, plans = planned(options)
    by_role = gemms(plans)
    assert all(p.kind is GemmKind.FAKE_QUANT for p in by_role.values())
    assert by_role[Role.FORWARD].widths == (4, 4) and by_role[Role.WGRAD].widths == (8, 4)
    # The other operand of a backward GEMM is re-quantized at 8 bits.
    assert [by_role[r].describe() for r in Role] == [
        "fake-quant W4A4",
        "fake-quant W8G4",
        "fake-quant A8G4",
    ]


def test_a_role_the_config_keeps_float_is_planned_float():
    _, plans = planned({"wgrad": False})
    by_role = gemms(plans)
    assert by_role[Role.WGRAD].kind is GemmKind.FLOAT
    assert by_role[Role.WGRAD].describe() == "float matmul"
    assert by_role[Role.WGRAD].widths == (0, 0)
    assert by_role[Role.FORWARD].kind is GemmKind.INT8


def test_fallback_plans_float_and_exact_statistics(monkeypatch):
    from gradq_fx import fallback

    monkeypatch.setattr(fallback, "speedup", lambda lowering, target, arguments: 0.5)
    _, plans = planned(lowering=Lowering.TRITON, rule=Fallback.SLOWER)
    wgrad = gemms(plans)[Role.WGRAD]
    assert wgrad.kind is GemmKind.FALLBACK and not wgrad.runs_in_int8
    assert wgrad.describe() == "float fallback (INT8 0.50x)"
    assert all(s.exact for s in plans if isinstance(s, plan.StatsPlan))


def test_ensure_plans_once(monkeypatch):
    graph, _ = planned()
    monkeypatch.setattr(plan, "gemm_plan", lambda *args: pytest.fail("planned again"))
    plan.ensure(graph, Lowering.AUTO, Fallback.NEVER)
