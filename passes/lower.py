"""Lower every gradq op of the joint graph (`gradq.mm`, `gradq.conv2d`,
`gradq.quantization_stats`) to its numerics, for Inductor.

Runs as Inductor's joint-graph custom pass (forward + backward before partitioning; the
forward graph alone for inference). Each opaque GEMM node becomes what the config's
`lowering` names (`gradq_fx.config.Lowering`; `auto` resolves per device in `resolve`):

    before:  mm = torch.ops.gradq.mm(tangent_view, primals_2, None,
                                     "8:per_row:nearest:iqr", "8:per_row:nearest:minmax",
                                     "dgrad", "blocks.0.mlp.fc1")
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

A `gradq.quantization_stats` (a layer's gradient statistics, `gradq_fx.stats`) becomes
`ops.stats_reference`, or under `triton` and `fused` `ops.stats_triton` (per-row iqr clips
from `kernels/iqr.py` instead of the reference's histogram).

A `gradq.conv2d` (a dense convolution's GEMM) becomes `ops.conv_reference` (the integer
convolution of `kernels/int_mm.py`) or `ops.conv_triton` (the implicit-GEMM kernel of
`kernels/conv.py`, its operands quantized as `triton` or `fused` say) the same way.

With the config's `fallback` at `slower`, a GEMM that `triton` or `fused` would run on CUDA,
but whose INT8 path measures slower than its float GEMM (`gradq_fx.fallback`), becomes that
float GEMM instead (`ops.mm_reference` or `ops.conv_reference` without specs):

    after, fallen back:  mm = aten.mm(tangent_view, primals_2)   (in the operands' dtype)

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
from torch.fx.operator_schemas import normalize_function

import gradq_fx
from gradq_fx import fallback, kernels, ops, quantizer
from gradq_fx.config import (
    Clipping,
    Fallback,
    Lowering,
    QuantSpec,
    Role,
    decode_operand,
    operand_bits,
)

# What a gradq.mm is lowered to, as the report names it: the resolved `Lowering`'s value
# ('reference', 'inductor_template', 'triton', 'fused'), or one of these.
SIMULATED_LOWERING = "simulated"  # IQS operand: decoded operands, float GEMM
FLOAT_LOWERING = "float matmul"  # a role the config keeps in float
# Fake quantization (quantize, dequantize, float GEMM): an operand below 8 bits, named with
# the operands' widths ("fake-quant W4A4"); "LSQ fake-quant W4A4" where LSQ quantizers
# (gradq_fx.qat) quantized the operands upstream and the GEMM takes them as they are.
FAKE_QUANT_LOWERING = "fake-quant"
LSQ_LOWERING = "LSQ fake-quant"
# A GEMM whose INT8 path measured slower than its float GEMM (`gradq_fx.fallback`), named with
# the measured ratio: "float fallback (INT8 0.62x)".
FALLBACK_LOWERING = "float fallback"

STATS = torch.ops.gradq.quantization_stats.default
# Set by `_mark_exact_stats` on a statistics node whose module's wgrad falls back to float.
EXACT_STATS = "gradq_exact_stats"


def resolve(lowering: Lowering, device: torch.device) -> Lowering:
    """The lowering `lowering` means for GEMMs on `device` (never AUTO)."""
    if lowering is Lowering.AUTO:
        on_gpu = device.type == "cuda" and kernels.triton_installed()
        return Lowering.TRITON if on_gpu else Lowering.REFERENCE
    if lowering is Lowering.INDUCTOR_TEMPLATE and device.type != "cuda":
        raise ValueError(
            f"option 'lowering': {lowering.value!r} forces Inductor's Triton GEMM template, "
            f"which needs a CUDA device; the model runs on {device.type} (use 'auto')"
        )
    return lowering


def lowering_of(
    a_spec: str,
    b_spec: str,
    lowering: Lowering = Lowering.REFERENCE,
    operands: tuple[str, str] = ("A", "W"),
) -> str:
    """The report's name for what a gradq.mm with these specs becomes (`lowering` resolved).

    operands: what a and b are, "W" (weight), "A" (activation) or "G" (gradient); a
    fake-quantized GEMM is named by its operands' widths in the order W, A, G: "W4A4" for a
    4-bit forward, "W8G4" for its dgrad and "A8G4" for its wgrad with 4-bit gradients.
    """
    if not (a_spec and b_spec):
        return FLOAT_LOWERING
    a, b = decode_operand(a_spec), decode_operand(b_spec)
    if Clipping.IQS in (getattr(a, "clipping", None), getattr(b, "clipping", None)):
        return SIMULATED_LOWERING
    if not quantizer.is_fake_quantized(a, b):
        return lowering.value
    kind = LSQ_LOWERING if None in (a, b) else FAKE_QUANT_LOWERING
    named = zip(operands, (operand_bits(a_spec), operand_bits(b_spec)), strict=True)
    widths = "".join(f"{letter}{bits}" for letter, bits in sorted(named, key=_operand_order))
    return f"{kind} {widths}"


def _operand_order(named: tuple[str, int]) -> int:
    return "WAG".index(named[0])


def node_lowering(
    node: fx.Node,
    lowering: Lowering,
    rule: Fallback = Fallback.NEVER,
    operands: tuple[str, str] = ("A", "W"),
) -> str:
    """The report's name for what the gradq.mm or gradq.conv2d `node` becomes: `lowering_of`'s,
    or under `rule` SLOWER a FALLBACK_LOWERING where its INT8 path measured slower on the
    device (`gradq_fx.fallback.speedup`). The pass and the report both ask here."""
    arguments = arguments_of(node)
    resolved = resolve(lowering, arguments["a"].device)
    name = lowering_of(arguments["a_spec"], arguments["b_spec"], resolved, operands)
    if rule is Fallback.SLOWER and name in (Lowering.TRITON.value, Lowering.FUSED.value):
        ratio = fallback.speedup(node.target, arguments)
        if ratio is not None and ratio < 1:
            return f"{FALLBACK_LOWERING} (INT8 {ratio:.2f}x)"
    return name


def arguments_of(node: fx.Node) -> dict:
    """A gradq op node's arguments by name, each node replaced by its value (a fake tensor)."""
    normalized = normalize_function(
        node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
    )
    return {
        name: value.meta["val"] if isinstance(value, fx.Node) else value
        for name, value in normalized.kwargs.items()
    }


def falls_back(lowering: str) -> bool:
    return lowering.startswith(FALLBACK_LOWERING)


def runs_in_int8(lowering: str) -> bool:
    """Whether a GEMM `lowering_of` names so runs as an INT8 GEMM."""
    return lowering in {member.value for member in Lowering}


@functools.cache
def _patterns(lowering: Lowering, rule: Fallback) -> PatternMatcherPass:
    patterns = PatternMatcherPass()
    names = ("a", "b", "bias", "a_spec", "b_spec", "role", "module")
    pattern = CallFunction(torch.ops.gradq.mm.default, *(KeywordArg(n) for n in names))

    @register_graph_pattern(pattern, pass_dict=patterns)
    def _lower(match: Match, a, b, bias, a_spec, b_spec, role, module):
        name = node_lowering(match.output_node(), lowering, rule)
        mm = _gemm(ops.mm_reference, ops.mm_triton, name)
        specs = ("", "") if falls_back(name) else (a_spec, b_spec)

        def replacement(a, b, bias):
            return mm(a, b, bias, *specs)

        match.replace_by_example(replacement, [a, b, bias])

    names = ("a", "b", "bias", "stride", "padding", "size", "a_spec", "b_spec", "role", "module")
    pattern = CallFunction(torch.ops.gradq.conv2d.default, *(KeywordArg(n) for n in names))

    @register_graph_pattern(pattern, pass_dict=patterns)
    def _lower_conv(match: Match, a, b, bias, stride, padding, size, a_spec, b_spec, role, module):
        name = node_lowering(match.output_node(), lowering, rule)
        conv = _gemm(ops.conv_reference, ops.conv_triton, name)
        specs = ("", "") if falls_back(name) else (a_spec, b_spec)

        def replacement(a, b, bias):
            return conv(a, b, bias, stride, padding, size, *specs, role)

        match.replace_by_example(replacement, [a, b, bias])

    names = ("x", "spec", "dim", "module")
    pattern = CallFunction(STATS, *(KeywordArg(n) for n in names))

    @register_graph_pattern(pattern, pass_dict=patterns)
    def _lower_stats(match: Match, x, spec, dim, module):
        resolved = resolve(lowering, x.meta["val"].device)
        kernels_clip = resolved in (Lowering.TRITON, Lowering.FUSED)
        iqs = QuantSpec.decode(spec).clipping is Clipping.IQS
        stats = ops.stats_triton if kernels_clip and not iqs else ops.stats_reference
        if match.output_node().meta.get(EXACT_STATS):
            stats = ops.stats_exact

        def replacement(x):
            return stats(x, spec, dim)

        match.replace_by_example(replacement, [x])

    return patterns


def _gemm(reference, kernel, lowering: str):
    """What computes a GEMM the report names `lowering`: `kernel` (ops.mm_triton or
    ops.conv_triton) for triton and fused, else `reference` (reference, inductor_template:
    the same graph; simulated, fake-quant, float and fallback GEMMs)."""
    if lowering == Lowering.TRITON.value:
        return kernel
    if lowering == Lowering.FUSED.value:
        return functools.partial(kernel, fused=True)
    return reference


def run(
    graph: fx.Graph, lowering: Lowering = Lowering.AUTO, rule: Fallback = Fallback.NEVER
) -> int:
    """Replace every gradq.mm, gradq.conv2d and gradq.quantization_stats in `graph`; return
    how many were replaced.

    rule: the config's `fallback`; SLOWER lowers a GEMM whose INT8 path measures slower than
    float (on CUDA, triton and fused lowerings: `gradq_fx.fallback`) to its float GEMM.
    """
    if rule is Fallback.SLOWER:
        _mark_exact_stats(graph, lowering, rule)
    count = _patterns(lowering, rule).apply(graph)
    graph.lint()
    return count


def _mark_exact_stats(graph: fx.Graph, lowering: Lowering, rule: Fallback) -> None:
    """Mark the statistics of each module whose wgrad GEMM falls back to float: that gradient
    is used as it is, so its statistics are exact (`ops.stats_exact`), and the adaptive
    learning rate leaves the layer alone. Decided before any GEMM is lowered."""
    wgrads = {}
    for target in (torch.ops.gradq.mm.default, torch.ops.gradq.conv2d.default):
        for node in graph.find_nodes(op="call_function", target=target):
            arguments = arguments_of(node)
            if arguments["role"] == Role.WGRAD.value:
                wgrads[arguments["module"]] = node
    for node in graph.find_nodes(op="call_function", target=STATS):
        wgrad = wgrads.get(arguments_of(node)["module"])
        if wgrad is not None and falls_back(node_lowering(wgrad, lowering, rule)):
            node.meta[EXACT_STATS] = True


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
    """`run` as Inductor's joint custom pass, with a uuid that keeps the caches honest.

    observe: called with each graph's module before it is lowered (the backend's report of
    what it rewrote); no part of the uuid, as it changes nothing in the graph.
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
        if self.observe is not None:
            self.observe(graph.owning_module)
        run(graph, self.lowering, self.rule)

    def uuid(self) -> str:
        return f"{source_hash()}:{self.lowering.value}:{self.rule.value}"
