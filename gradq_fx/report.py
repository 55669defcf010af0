"""What gradq rewrote in a model, read off the graphs AOTAutograd derives.

`report(model, example_inputs, config)` captures the model with Dynamo, applies gradq's
rewrite, and asks AOTAutograd for the joint forward+backward graph (the forward graph alone
for inference), without compiling anything. It then lists:
- one row per gradq GEMM (graph fwd/bwd, role, module, operand shapes and specs, lowering);
- every other matmul-like op (any op torch's FLOP counter counts) with the reason it stayed
  in float, its role worked out from the graph;
- the GEMM FLOPs in INT8 per role against the total.
Graph questions (what depends on a gradient, what reaches a weight's gradient) are answered
with networkx on the FX graph.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import networkx as nx
import torch
from tabulate import tabulate
from torch import fx
from torch.utils.flop_counter import (
    conv_flop_count,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from gradq_fx import plan, stats
from gradq_fx.aot import aot_eager
from gradq_fx.config import GradQConfig, Granularity, Role, decode_operand, operand_bits
from gradq_fx.passes import prepare
from gradq_fx.passes.annotate import Decision, Reason, module_path
from gradq_fx.passes.subgraphs import body_nodes, float_reason, hop_name, is_hop
from gradq_fx.quantizer import conv2d_scale_groups

aten = torch.ops.aten

# CPU attention kernels share the signatures of the flash ones the FLOP counter knows.
_FLOP_ALIASES = {
    aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        aten._scaled_dot_product_flash_attention_backward
    ),
}
# Flex attention's two higher-order ops, counted here as dense attention (QK^T and PV, and
# their gradients), whatever their masks skip: torch's FLOP counter knows them from 2.13 on,
# not before, and one formula keeps the report the same on every version.
_FLEX_FORWARD = torch.ops.higher_order.flex_attention
_FLEX_BACKWARD = torch.ops.higher_order.flex_attention_backward
# Layout and dtype changes: a backward GEMM whose result reaches a weight's gradient through
# these alone is a wgrad. (Not add or sum: the residual stream's gradient reaches the
# positional embedding's gradient through them, which does not make every dgrad a wgrad.)
_PASSTHROUGH = {
    aten.t, aten.transpose, aten.permute, aten.view, aten._unsafe_view, aten.reshape,
    aten.clone, aten.contiguous, aten.expand, aten.squeeze, aten.unsqueeze, aten.alias,
    aten._to_copy, torch.ops.prims.convert_element_type,
}  # fmt: skip


def _not_int8_reason(gemm: plan.GemmPlan) -> tuple[str, Reason]:
    """Why a planned gradq GEMM does not run in INT8, and the kind of reason: the options' (a
    disabled role, IQS, fake quantization) or the fallback rule's."""
    name, role = gemm.describe(), gemm.role.value
    if gemm.kind is plan.GemmKind.FLOAT:
        return f"{role} disabled by config ({role}=False)", Reason.CONFIG
    if gemm.kind is plan.GemmKind.SIMULATED:
        return "IQS codebook: simulated (decoded operands, float GEMM)", Reason.CONFIG
    if gemm.kind is plan.GemmKind.FALLBACK:
        reason = (
            f"{name}: its INT8 path measured slower than the float GEMM on this device "
            "(option fallback='never' keeps it INT8)"
        )
        return reason, Reason.FALLBACK
    if gemm.kind is plan.GemmKind.LSQ:
        return f"{name}: LSQ quantizers quantized the operands upstream; float GEMM", Reason.CONFIG
    reason = f"{name}: below 8 bits, fake quantization (quantize, dequantize, float GEMM)"
    return reason, Reason.CONFIG


@dataclasses.dataclass(frozen=True)
class GemmRow:
    graph: str  # "fwd" or "bwd"
    role: str
    module: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    a_spec: str
    b_spec: str
    lowering: str  # `plan.GemmPlan.describe()`: "triton", "fake-quant W4A4", ...
    flops: int
    graph_role: str  # the role the graph's structure implies; equals `role` when labels are right
    op: str = "gradq.mm"  # or "gradq.conv2d", a dense convolution's implicit GEMM
    # What one scale of each operand covers: a row / column of the GEMM, or for an implicit
    # GEMM an image or channel (per_row cannot be per pixel there), or the tensor; "" = float.
    a_scales: str = ""
    b_scales: str = ""
    kind: str = plan.GemmKind.INT8.value  # a `plan.GemmKind` value

    @property
    def runs_in_int8(self) -> bool:
        return self.kind == plan.GemmKind.INT8.value


@dataclasses.dataclass(frozen=True)
class FloatOp:
    graph: str
    role: str
    op: str
    module: str
    flops: int
    reason: str
    code: str  # an `annotate.Reason` value: what kind of reason (the log groups by it)


@dataclasses.dataclass(frozen=True)
class Report:
    config: GradQConfig
    training: bool
    gemms: tuple[GemmRow, ...]
    float_ops: tuple[FloatOp, ...]

    @property
    def int8_gemms(self) -> tuple[GemmRow, ...]:
        return tuple(row for row in self.gemms if row.runs_in_int8)

    def coverage(self) -> dict[str, dict[str, float]]:
        """Per role and in total: GEMM FLOPs in INT8, all matmul-like FLOPs, and their ratio."""
        roles = [role.value for role in Role]
        int8 = dict.fromkeys(roles, 0)
        total = dict.fromkeys(roles, 0)
        for row in self.int8_gemms:
            int8[row.role] += row.flops
            total[row.role] += row.flops
        for op in self.float_ops:  # includes gradq GEMMs whose role the config keeps float
            total[op.role] += op.flops
        int8["total"], total["total"] = sum(int8.values()), sum(total.values())
        return {
            key: {
                "int8_flops": int8[key],
                "flops": total[key],
                "ratio": _ratio(int8[key], total[key]),
            }
            for key in total
        }

    def ops_with(self, *codes: Reason) -> tuple[FloatOp, ...]:
        """The float matmul-like ops whose reason is of one of these kinds."""
        values = {code.value for code in codes}
        return tuple(op for op in self.float_ops if op.code in values)

    def summary(self) -> str:
        """One line: GEMMs rewritten, the INT8 share of GEMM FLOPs per role, the lowering,
        and how many matmul-like ops stay float and why (what the backend logs at INFO)."""
        shares = ", ".join(
            f"{key} {c['ratio']:.1%}" for key, c in self.coverage().items() if c["flops"]
        )
        lowerings = ", ".join(sorted({row.lowering for row in self.int8_gemms})) or "none"
        counts = ", ".join(
            f"{label} {len(self.ops_with(code))}"
            for label, code in (
                ("float fallbacks", Reason.FALLBACK),
                ("kept float by the options", Reason.CONFIG),
                ("no INT8 path", Reason.NO_INT8_PATH),
                ("unreachable", Reason.UNREACHABLE),
            )
        )
        return (
            f"{len(self.gemms)} GEMMs rewritten ({len(self.int8_gemms)} in INT8); INT8 share of "
            f"GEMM FLOPs: {shares or 'no GEMMs'}; lowering: {lowerings}; matmul-like ops in "
            f"float: {counts}"
        )

    def warning(self) -> str | None:
        """The matmul-like ops gradq cannot rewrite (no INT8 path, or in a body it does not
        look into), grouped by reason with their modules; None if there are none."""
        warned = self.ops_with(*(code for code in Reason if code.warned))
        if not warned:
            return None
        modules: dict[str, set[str]] = {}
        for op in warned:
            modules.setdefault(op.reason, set()).add(op.module or "<top level>")
        groups = "; ".join(
            f"{reason} [{', '.join(sorted(names))}]" for reason, names in modules.items()
        )
        return f"{len(warned)} matmul-like ops stay float where gradq cannot rewrite them: {groups}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_options(),
            "training": self.training,
            "gemms": [dataclasses.asdict(row) for row in self.gemms],
            "float_ops": [dataclasses.asdict(op) for op in self.float_ops],
            "coverage": self.coverage(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        gemm_rows = [
            (
                row.graph,
                row.role,
                row.module,
                "x".join(map(str, row.a_shape)),
                "x".join(map(str, row.b_shape)),
                _spec_text(row.a_spec, row.a_scales),
                _spec_text(row.b_spec, row.b_scales),
                row.lowering,
            )
            for row in self.gemms
        ]
        header = ("graph", "role", "module", "A", "B", "A spec", "B spec", "lowering")
        parts = [f"gradq GEMMs ({len(self.int8_gemms)} in INT8 of {len(self.gemms)} rewritten)"]
        parts.append(tabulate(gemm_rows, headers=header, tablefmt="simple"))
        per_image = [row for row in self.gemms if "per image" in (row.a_scales, row.b_scales)]
        if per_image:
            parts.append(
                f"{len(per_image)} implicit-GEMM convolution GEMMs (gradq.conv2d) scale X "
                "(forward) or dY (dgrad) per image where per_row was asked: a per-pixel scale "
                "would vary along the kernel window, which the integer sum runs over."
            )
        summary = [
            (key, f"{c['int8_flops'] / 1e6:,.2f}", f"{c['flops'] / 1e6:,.2f}", f"{c['ratio']:.1%}")
            for key, c in self.coverage().items()
        ]
        parts.append("\nGEMM FLOPs covered by INT8")
        parts.append(tabulate(summary, headers=("role", "INT8 MFLOP", "all MFLOP", "covered")))
        if self.float_ops:
            float_rows = [
                (op.graph, op.role, op.op, op.module, f"{op.flops / 1e6:,.2f}", op.reason)
                for op in self.float_ops
            ]
            parts.append(f"\nMatmul-like ops left in float ({len(self.float_ops)})")
            parts.append(
                tabulate(float_rows, headers=("graph", "role", "op", "module", "MFLOP", "reason"))
            )
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.to_text()


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else math.nan


def _spec_text(spec: str, scales: str = "") -> str:
    if not spec:
        return "float"
    s = decode_operand(spec)
    if s is None:
        return f"LSQ int{operand_bits(spec)} (quantized upstream)"
    scaled = " scaled" if s.scaling else ""
    granularity = s.granularity.value
    if scales.startswith("per ") and scales not in ("per row", "per column"):
        granularity = scales.replace(" ", "_")  # an implicit GEMM's: per_image, per_..._channel
    return f"int{s.bits} {granularity} {s.rounding.value} {s.clipping.value}{scaled}"


_GEMMS = plan.GEMM_OPS


def _scales(node: fx.Node) -> tuple[str, str]:
    """What one scale of each operand of a gradq GEMM node covers (GemmRow.a_scales)."""
    arguments = plan.arguments_of(node)
    a_spec, b_spec = arguments["a_spec"], arguments["b_spec"]
    if not (a_spec and b_spec):
        return "", ""
    # An LSQ operand (decoded as None) has one learnable step per tensor (or q/k/v block).
    a_grain, b_grain = (
        Granularity.PER_TENSOR if decoded is None else decoded.granularity
        for decoded in (decode_operand(a_spec), decode_operand(b_spec))
    )
    if node.target is _GEMMS[0]:
        a_group, b_group = "row", "column"
    else:
        role = arguments["role"]
        a_group = conv2d_scale_groups(role, a_grain)[0]
        b_group = conv2d_scale_groups(role, b_grain)[1]
    return tuple(
        "per tensor" if grain is Granularity.PER_TENSOR else f"per {group}"
        for grain, group in ((a_grain, a_group), (b_grain, b_group))
    )


# --- capture -------------------------------------------------------------------------------


@dataclasses.dataclass
class Captured:
    """One graph AOTAutograd derived from a Dynamo graph, with what the analysis needs."""

    graph: fx.GraphModule  # the joint forward+backward graph, or an inference graph
    is_parameter: list[bool]  # per primal: whether its gradient is a weight's
    num_forward_outputs: int | None  # None for an inference graph
    decisions: list[Decision]  # annotate's, for the Dynamo graph

    @classmethod
    def of(cls, graph: fx.GraphModule, is_parameter: list[bool], decisions: list[Decision]):
        """From the graph alone: a joint graph returns the forward's outputs, then one
        gradient per primal; a graph without tangents is an inference graph."""
        placeholders = list(graph.graph.find_nodes(op="placeholder"))
        if not any("tangents" in node.name for node in placeholders):
            return cls(graph, is_parameter, None, decisions)
        primals = sum("primals" in node.name for node in placeholders)
        outputs = len(graph.graph.output_node().args[0])
        return cls(graph, is_parameter, outputs - primals, decisions)


def primal_parameters(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[bool]:
    """Whether each primal AOTAutograd makes of a rewritten Dynamo graph is a weight: the graph
    module's own parameters (gradq's statistics probes, whose gradients are statistics, not
    weight gradients) come first, then the inputs (a probe is an input of a piece of a split
    graph, `gradq_fx.regions`)."""
    probes = [False] * len(list(gm.parameters()))
    return probes + [isinstance(i, torch.nn.Parameter) and not stats.is_probe(i) for i in inputs]


def capture(
    model, example_inputs: Sequence[Any], config: GradQConfig, training: bool
) -> list[Captured]:
    """Run `model` once under Dynamo with gradq's rewrite and return the graphs AOTAutograd
    derives (one per Dynamo graph), compiling nothing: what `report` analyses."""
    captured: list[Captured] = []

    def backend(gm: fx.GraphModule, inputs):
        return _trace(gm, inputs, prepare(gm, config), captured.append)

    compiled = torch.compile(model, backend=backend)
    with torch.set_grad_enabled(training):
        compiled(*example_inputs)
    return captured


def traced(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    decisions: list[Decision],
    config: GradQConfig,
    training: bool,
) -> Report:
    """The report of a rewritten Dynamo graph (or a piece of one, `gradq_fx.regions`) from an
    AOTAutograd trace that compiles nothing: for a compile that showed gradq no graph to
    analyse (a hit in AOTAutograd's cache, or a graph whose outputs all alias its inputs)."""
    captured: list[Captured] = []
    _trace(gm, example_inputs, decisions, captured.append)
    return analyse(captured, config, training)


def _trace(
    gm: fx.GraphModule,
    inputs: Sequence[Any],
    decisions: list[Decision],
    keep: Callable[[Captured], None],
) -> Callable:
    """`aot_eager` over a rewritten graph, handing `keep` each graph AOTAutograd derives."""
    is_parameter = primal_parameters(gm, inputs)
    return aot_eager(gm, inputs, lambda graph: keep(Captured.of(graph, is_parameter, decisions)))


# --- analysis ------------------------------------------------------------------------------


def _size(value) -> int:
    """A size as an int, without the guard int() would add to a symbolic size (which would
    make Dynamo recompile a dynamic-shape graph for every size): its example value."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        return 0 if hint is None else int(hint)  # an unbacked size has no example value
    return int(value)


def _shape(value: torch.Tensor) -> tuple[int, ...]:
    return tuple(_size(s) for s in value.shape)


def _flops(node: fx.Node, output_mask: list[bool] | None = None) -> int:
    if node.target is torch.ops.gradq.mm.default:
        arguments = plan.arguments_of(node)
        a, b = arguments["a"], arguments["b"]
        return 2 * math.prod(_size(s) for s in a.shape) * _size(b.shape[-1])
    if node.target is torch.ops.gradq.conv2d.default:
        # Every role multiplies each dY-shaped [N, O, H', W'] value by C kh kw weights (or
        # inputs): the forward's count, whatever zeros a lowering adds.
        arguments = plan.arguments_of(node)
        a, b, out = arguments["a"], arguments["b"], node.meta["val"]
        dy, weight = {"forward": (out, b), "dgrad": (a, b), "wgrad": (b, out)}[arguments["role"]]
        products = math.prod(_size(s) for s in dy.shape)
        return 2 * products * math.prod(_size(s) for s in weight.shape[1:])
    if node.target in (_FLEX_FORWARD, _FLEX_BACKWARD):
        query, key, value = (node.args[i].meta["val"].shape for i in range(3))
        if node.target is _FLEX_FORWARD:
            return _size(sdpa_flop_count(query, key, value))
        grad_out = node.args[5].meta["val"].shape
        return _size(sdpa_backward_flop_count(grad_out, query, key, value))
    packet = _FLOP_ALIASES.get(node.target.overloadpacket, node.target.overloadpacket)
    args, kwargs = torch.utils._pytree.tree_map_only(
        fx.Node, lambda n: n.meta["val"], (node.args, node.kwargs)
    )
    if output_mask is not None:  # convolution_backward: count only the masked-in outputs
        args = (*args[:-1], output_mask)
    return _size(flop_registry[packet](*args, out_val=node.meta["val"], **kwargs))


def _conv_wgrad_flops(node: fx.Node) -> int:
    """The FLOPs of the weight gradient an `aten.convolution_backward` computes.

    torch's FLOP counter takes it for a convolution of the input by dY and ignores groups:
    it overcounts a grouped convolution's weight gradient by the number of groups (48x to
    128x for MobileViT's depthwise convolutions). Each weight of a convolution that is not
    transposed gets one product per output position and image, as in the forward: count that.
    """
    grad_out, x, weight = (node.args[i].meta["val"] for i in range(3))
    if node.args[7]:  # transposed
        return _flops(node, [False, True, False])
    return _size(conv_flop_count(list(x.shape), list(weight.shape), list(grad_out.shape)))


def _is_matmul_like(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _GEMMS:
        return True
    if node.target in (_FLEX_FORWARD, _FLEX_BACKWARD):
        return True
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    packet = _FLOP_ALIASES.get(node.target.overloadpacket, node.target.overloadpacket)
    return packet in flop_registry


def _walk(module: fx.GraphModule, hop: fx.Node | None = None):
    """(node, hop) for every node of a graph and of the bodies of its higher-order ops, however
    nested: hop is the top graph's higher-order op node whose body holds the node (None for
    the top graph's own nodes)."""
    for node in module.graph.nodes:
        yield node, hop
        if is_hop(node):
            for body in body_nodes(node):
                yield from _walk(getattr(module, body.target), hop or node)


def _passthrough(node: fx.Node) -> bool:
    return getattr(getattr(node, "target", None), "overloadpacket", None) in _PASSTHROUGH


class _GraphFacts:
    """Answers, from the joint graph's structure, where a node sits and what its result feeds."""

    def __init__(self, captured: Captured):
        graph = captured.graph.graph
        self.digraph = nx.DiGraph()
        for node in graph.nodes:
            self.digraph.add_node(node)
            for user in node.users:
                self.digraph.add_edge(node, user)
        tangents = [n for n in graph.nodes if n.op == "placeholder" and "tangents" in n.name]
        self.backward = set(tangents).union(*(nx.descendants(self.digraph, t) for t in tangents))
        self.weight_grads: set[fx.Node] = set()
        if captured.num_forward_outputs is not None:
            primals = [n for n in graph.nodes if n.op == "placeholder" and "primals" in n.name]
            outputs = graph.output_node().args[0][captured.num_forward_outputs :]
            is_parameter = captured.is_parameter
            if len(is_parameter) == len(primals) == len(outputs):
                self.weight_grads = {
                    out for out, param in zip(outputs, is_parameter, strict=True)
                    if param and isinstance(out, fx.Node)
                }  # fmt: skip
        # Nodes whose value *is* a weight's gradient up to layout and dtype changes.
        passthrough = self.digraph.subgraph(n for n in self.digraph.nodes if _passthrough(n))
        self.feeds_weight_grad = set()
        for out in self.weight_grads & set(passthrough.nodes):
            self.feeds_weight_grad |= {out} | nx.ancestors(passthrough, out)

    def graph_of(self, node: fx.Node) -> str:
        return "bwd" if node in self.backward else "fwd"

    def _is_weight_grad(self, node: fx.Node) -> bool:
        """Whether the node's result reaches a weight's gradient through pass-through ops."""
        return node in self.weight_grads or any(u in self.feeds_weight_grad for u in node.users)

    def roles_of(self, node: fx.Node, hop: fx.Node | None = None) -> list[tuple[str, int]]:
        """(role, FLOPs) of a float op, the role from the graph alone (not gradq's labels).

        hop: the higher-order op whose body holds the node; a body's result feeds a weight's
        gradient when it reaches, through pass-through ops, a body output whose value the op
        hands to one."""
        if (hop or node) not in self.backward:
            return [(Role.FORWARD.value, _flops(node))]
        if node.target is aten.convolution_backward.default:
            # One op, two GEMM-like products: split it by its output mask.
            wants_input_grad, wants_weight_grad, _ = node.args[-1]
            roles = []
            if wants_input_grad:
                roles.append((Role.DGRAD.value, _flops(node, [True, False, False])))
            if wants_weight_grad:
                roles.append((Role.WGRAD.value, _conv_wgrad_flops(node)))
            return roles
        feeds = self._is_weight_grad(node) if hop is None else self._body_feeds(node, hop)
        return [(Role.WGRAD.value if feeds else Role.DGRAD.value, _flops(node))]

    def _body_feeds(self, node: fx.Node, hop: fx.Node) -> bool:
        outputs = torch.utils._pytree.tree_leaves(node.graph.output_node().args[0])
        reached, frontier = {node}, [node]
        while frontier:
            for user in frontier.pop().users:
                if _passthrough(user) and user not in reached:
                    reached.add(user)
                    frontier.append(user)
        indices = {i for i, out in enumerate(outputs) if out in reached}
        return any(
            user.target is operator.getitem
            and user.args[1] in indices
            and (self._is_weight_grad(user) or user in self.feeds_weight_grad)
            for user in hop.users
        )


def _float_reason(node: fx.Node, op: str, hop: fx.Node | None, decisions: list[Decision]):
    """(reason, code) of a float matmul-like op of a joint graph: its higher-order op's, for a
    node in one's body; else the Dynamo-level decision it was traced from, found by the
    Dynamo node it names (`source_fn_stack`) or by module."""
    if hop is not None:
        return float_reason(hop.target), Reason.UNREACHABLE
    stack = node.meta.get("source_fn_stack") or node.meta.get("fwd_source_fn_stack") or []
    names = [entry[0] for entry in stack]
    module = module_path(node)
    floats = [d for d in decisions if not d.quantize]
    # Traced from inside a higher-order op's body at Dynamo level (checkpointing, a custom
    # autograd.Function): prefer the decisions made there.
    nested = len(names) > 1
    pool = [d for d in floats if bool(d.region) == nested] or floats
    matches = (
        lambda d: bool(names) and d.node == names[-1] and d.module == module,
        lambda d: d.module == module,
        lambda d: module.startswith(d.module + "."),
    )
    for match in matches:
        for decision in pool:
            if match(decision):
                return decision.reason, decision.code
    return f"{op}: not produced by a matmul gradq rewrites", Reason.NO_INT8_PATH


def analyse(captured: list[Captured], config: GradQConfig, training: bool) -> Report:
    """The report of captured graphs: their gradq GEMMs as planned (`gradq_fx.plan`; planned
    here unless the lowering pass did it), and every other matmul-like op with its reason."""
    gemms, float_ops = [], []
    for item in captured:
        plan.ensure(item.graph.graph, config.lowering, config.fallback)
        facts = _GraphFacts(item)
        for node, hop in _walk(item.graph):
            if not _is_matmul_like(node):
                continue
            graph = facts.graph_of(hop or node)
            if node.target in _GEMMS:
                gemm, arguments = plan.of(node), plan.arguments_of(node)
                a, b = arguments["a"], arguments["b"]
                row = GemmRow(
                    graph, gemm.role.value, gemm.module, _shape(a), _shape(b), *gemm.specs,
                    gemm.describe(), _flops(node), facts.roles_of(node)[0][0], gemm.op,
                    *_scales(node), kind=gemm.kind.value,
                )  # fmt: skip
                gemms.append(row)
                if not gemm.runs_in_int8:
                    reason, code = _not_int8_reason(gemm)
                    float_ops.append(
                        FloatOp(
                            graph, row.role, gemm.op, gemm.module, row.flops, reason, code.value
                        )
                    )
                continue
            module = module_path(node)
            packet = getattr(node.target, "overloadpacket", node.target)
            op = hop_name(packet) if is_hop(node) else str(packet).removeprefix("aten.")
            reason, code = _float_reason(node, op, hop, item.decisions)
            for role, flops in facts.roles_of(node, hop):
                float_ops.append(FloatOp(graph, role, op, module, flops, reason, code.value))
    return Report(config, training, tuple(gemms), tuple(float_ops))


def report(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    config: GradQConfig | Mapping[str, Any] | None = None,
    training: bool | None = None,
) -> Report:
    """The report of what gradq does to `model` on `example_inputs`.

    training: analyse the training step (forward and backward); defaults to `model.training`.
    Inference (training=False) quantizes and reports the forward GEMMs only.
    """
    config = GradQConfig.coerce(config)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    training = model.training if training is None else training
    captured = capture(model, example_inputs, config, training)
    if not captured:
        raise ValueError("report: Dynamo captured no graph from the model")
    return analyse(captured, config, training)
