"""Lower every `gradq.mm` of the joint graph to the reference numerics, for Inductor to compile.

Runs as Inductor's joint-graph custom pass (forward + backward before partitioning; the
forward graph alone for inference). Each opaque GEMM node becomes the pure-torch quantizer,
the exact int8 GEMM and the dequantize of `gradq_fx.quantizer.quantized_matmul`:

    before:  mm = torch.ops.gradq.mm(tangent_view, primals_2, None,
                                     "8:per_row:nearest:iqr", "8:per_row:nearest:minmax",
                                     "dgrad", "blocks.0.mlp.fc1")
    after:   abs = aten.abs(tangent_view); amax = aten.amax(abs, [1], True); ...
             ... the exact int8 GEMM (kernels/int_mm.py) ...; mm = aten.mul(acc, scales)

The pass is a `CustomGraphPass` whose uuid hashes the source of gradq's numerics and passes,
so Inductor's FX graph cache and AOTAutograd's cache stay correct when either changes.
"""

from __future__ import annotations

import functools
import hashlib
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
from gradq_fx import kernels, ops
from gradq_fx.config import Clipping, QuantSpec

# What a gradq.mm is lowered to, as the report names it. The Triton lowerings come later.
REFERENCE_LOWERING = "reference"  # torch quantizer + exact int8 GEMM, compiled by Inductor
SIMULATED_LOWERING = "simulated"  # IQS operand: decoded operands, float GEMM
FLOAT_LOWERING = "float matmul"


def lowering_of(a_spec: str, b_spec: str) -> str:
    if not (a_spec and b_spec):
        return FLOAT_LOWERING
    iqs = Clipping.IQS in (QuantSpec.decode(a_spec).clipping, QuantSpec.decode(b_spec).clipping)
    return SIMULATED_LOWERING if iqs else REFERENCE_LOWERING


@functools.cache
def _patterns() -> PatternMatcherPass:
    patterns = PatternMatcherPass()
    names = ("a", "b", "bias", "a_spec", "b_spec", "role", "module")
    pattern = CallFunction(torch.ops.gradq.mm.default, *(KeywordArg(n) for n in names))

    @register_graph_pattern(pattern, pass_dict=patterns)
    def _lower(match: Match, a, b, bias, a_spec, b_spec, role, module):
        def reference(a, b, bias):
            return ops.mm_reference(a, b, bias, a_spec, b_spec)

        match.replace_by_example(reference, [a, b, bias])

    return patterns


def run(graph: fx.Graph) -> int:
    """Replace every gradq.mm in `graph`; return how many were replaced."""
    count = _patterns().apply(graph)
    graph.lint()
    return count


def source_files() -> list[Path]:
    """Every source file of gradq whose change can change a lowered graph."""
    roots = (Path(gradq_fx.__file__).parent, Path(__file__).parent, Path(kernels.__file__).parent)
    return sorted(path for root in roots for path in root.glob("*.py"))


@functools.cache
def source_hash() -> str:
    """A hash of torch's version and gradq's source (numerics, ops, passes, kernels)."""
    digest = hashlib.sha256(torch.__version__.encode())
    for path in source_files():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class LowerPass(CustomGraphPass):
    """`run` as Inductor's joint custom pass, with a uuid that keeps the caches honest."""

    def __call__(self, graph: fx.Graph) -> None:
        run(graph)

    def uuid(self) -> str:
        return source_hash()
