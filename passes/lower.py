"""Lower every gradq op of the joint graph (`gradq.mm`, `gradq.conv2d`,
`gradq.quantization_stats`) to what its plan says, for Inductor.

Runs as Inductor's joint-graph custom pass (forward + backward before partitioning; the
forward graph alone for inference). It first plans the graph (`gradq_fx.plan`: one typed
plan per op, the fallback timing included), then replaces each op by the computation of the
lowering object its plan names (`gradq_fx.lowerings`):

    before:  mm = torch.ops.gradq.mm(tangent_view, primals_2, None,
                                     "8:per_row:nearest:iqr", "8:per_row:nearest:minmax",
                                     "dgrad", "GW", "blocks.0.mlp.fc1")
    after, reference (and inductor_template, which only changes Inductor's GEMM choice):
             abs = aten.abs(tangent_view); amax = aten.amax(abs, [1], True); ...
             ... the exact int8 GEMM (kernels/int_mm.py) ...; mm = aten.mul(acc, scales)
    after, triton:
             clip = gradq.iqr_clip_rows(tangent_view, 8)   (iqr clipping only)
             q_a, s_a = gradq.quantize_rows(tangent_view, clip, 8, False, None, True, False)
             q_b, s_b = gradq.quantize_rows(permute(primals_2), None, 8, ...)
             mm = gradq.int8_scaled_mm(q_a, permute(q_b), s_a, s_b, None, float32)
    after, fused: as triton, with each gradq.quantize_rows replaced by the reference's ops
             (abs, amax, div, round, clamp, to int8), which Inductor fuses into the kernel
             that produces the operand
    after, a GEMM planned float (a role kept float, or fallen back):
             mm = aten.mm(tangent_view, primals_2)   (in the operands' dtype)

A GEMM planned as fake quantization (below 8 bits, IQS, LSQ operands) becomes the
reference's fake quantization whatever the lowering. A `gradq.quantization_stats` becomes its
lowering's `stats`, or exact statistics where its layer's wgrad fell back to float.

The pass is a `CustomGraphPass` whose uuid hashes the source of gradq's numerics and passes,
so Inductor's FX graph cache and AOTAutograd's cache stay correct when either changes.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import (
    CallFunction,
    KeywordArg,
    Match,
    PatternMatcherPass,
    register_graph_pattern,
)

import gradq_fx
from gradq_fx import kernels, lowerings, plan
from gradq_fx.config import Fallback, Lowering, QuantSpec
from gradq_fx.lowerings import reference
from gradq_fx.passes import timed

_GEMM_ARGS = ("a", "b", "bias", "a_spec", "b_spec", "role", "operands", "module")
_CONV_ARGS = ("a", "b", "bias", "stride", "padding", "size", *_GEMM_ARGS[3:])


def _gemm(gemm_plan: plan.GemmPlan) -> Callable:
    """What computes a planned gradq.mm, as a function of (a, b, bias)."""
    if gemm_plan.kind in (plan.GemmKind.FLOAT, plan.GemmKind.FALLBACK):
        return reference.float_mm
    if not gemm_plan.runs_in_int8:  # fake quantization, the reference's whatever the lowering
        return lambda a, b, bias: reference.run_mm(a, b, bias, *gemm_plan.specs)
    lowering = lowerings.get(gemm_plan.lowering)
    a_spec, b_spec = (QuantSpec.decode(spec) for spec in gemm_plan.specs)
    return lambda a, b, bias: lowering.mm(a, b, bias, a_spec, b_spec)


def _conv(gemm_plan: plan.GemmPlan, stride, padding, size) -> Callable:
    """What computes a planned gradq.conv2d, as a function of (a, b, bias)."""
    geometry, role = (tuple(stride), tuple(padding), tuple(size)), gemm_plan.role
    if gemm_plan.kind in (plan.GemmKind.FLOAT, plan.GemmKind.FALLBACK):
        return lambda a, b, bias: reference.float_conv2d(a, b, bias, *geometry, role.value)
    if not gemm_plan.runs_in_int8:
        specs = gemm_plan.specs
        return lambda a, b, bias: reference.run_conv2d(a, b, bias, *geometry, *specs, role.value)
    lowering = lowerings.get(gemm_plan.lowering)
    specs = tuple(QuantSpec.decode(spec) for spec in gemm_plan.specs)
    return lambda a, b, bias: lowering.conv2d(a, b, bias, *geometry, *specs, role)


@functools.cache
def _patterns() -> PatternMatcherPass:
    patterns = PatternMatcherPass()

    pattern = CallFunction(torch.ops.gradq.mm.default, *map(KeywordArg, _GEMM_ARGS))

    @register_graph_pattern(pattern, pass_dict=patterns)
    def _lower_mm(match: Match, a, b, bias, **_labels):
        match.replace_by_example(_gemm(plan.of(match.output_node())), [a, b, bias])

    pattern = CallFunction(torch.ops.gradq.conv2d.default, *map(KeywordArg, _CONV_ARGS))

    @register_graph_pattern(pattern, pass_dict=patterns)
    def _lower_conv(match: Match, a, b, bias, stride, padding, size, **_labels):
        compute = _conv(plan.of(match.output_node()), stride, padding, size)
        match.replace_by_example(compute, [a, b, bias])

    pattern = CallFunction(plan.STATS_OP, *map(KeywordArg, ("x", "spec", "dim", "module")))

    @register_graph_pattern(pattern, pass_dict=patterns)
    def _lower_stats(match: Match, x, spec, dim, module):
        stats_plan = plan.of(match.output_node())
        if stats_plan.exact:
            compute = reference.exact_stats
        else:
            lowering, spec_ = lowerings.get(stats_plan.lowering), QuantSpec.decode(spec)
            compute = functools.partial(lowering.stats, spec=spec_, dim=dim)
        match.replace_by_example(compute, [x])

    return patterns


def run(
    graph: fx.Graph, lowering: Lowering = Lowering.AUTO, rule: Fallback = Fallback.NEVER
) -> int:
    """Plan `graph` (`gradq_fx.plan.run`: lowering, the config's; rule, its fallback), then
    `apply` the plans; return how many ops were replaced."""
    plan.run(graph, lowering, rule)
    return apply(graph)


def apply(graph: fx.Graph) -> int:
    """Replace every planned gradq.mm, gradq.conv2d and gradq.quantization_stats of `graph`
    by what its plan says; return how many were replaced."""
    count = _patterns().apply(graph)
    graph.lint()
    return count


def source_files() -> list[Path]:
    """Every source file of gradq whose change can change a lowered graph."""
    roots = (Path(gradq_fx.__file__).parent, Path(__file__).parent, Path(kernels.__file__).parent)
    return sorted(path for root in roots for path in root.rglob("*.py"))


@functools.cache
def source_hash() -> str:
    """A hash of torch's version and gradq's source (numerics, ops, passes, kernels)."""
    digest = hashlib.sha256(torch.__version__.encode())
    for path in source_files():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class LowerPass(CustomGraphPass):
    """`run` as Inductor's joint custom pass, with a uuid that keeps the caches honest.

    observe: called with each graph's module once it is planned, before it is lowered (the
    backend's report of what it rewrote); no part of the uuid, as it changes nothing.
    """

    def __init__(
        self,
        lowering: Lowering = Lowering.AUTO,
        rule: Fallback = Fallback.NEVER,
        observe: Callable[[fx.GraphModule], None] | None = None,
    ):
        self.lowering = lowering
        self.rule = rule
        self.observe = observe

    def __call__(self, graph: fx.Graph) -> None:
        with timed("lower"):
            plan.run(graph, self.lowering, self.rule)
            if self.observe is not None:
                self.observe(graph.owning_module)
            apply(graph)

    def uuid(self) -> str:
        return f"{source_hash()}:{self.lowering.value}:{self.rule.value}"
