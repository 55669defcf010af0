"""The plan: what each gradq op of a graph becomes, decided once per graph.

`run(graph, lowering, rule)` reads every `gradq.mm` and `gradq.conv2d` node's arguments (by
name) and stores a `GemmPlan` in its `node.meta["gradq_plan"]`; every
`gradq.quantization_stats` node gets a `StatsPlan`. The graph's nodes are unchanged:

    before:  mm = gradq.mm(tangent, primals_2, None, "8:per_row:nearest:iqr",
                           "8:per_row:nearest:minmax", "dgrad", "GW", "blocks.0.mlp.fc1")
    after:   the same node, with
             mm.meta["gradq_plan"] = GemmPlan(op="gradq.mm", role=Role.DGRAD,
                 module="blocks.0.mlp.fc1", operands=(G, W), specs=(...), kind=GemmKind.INT8,
                 lowering=Lowering.TRITON, speedup=1.31)

The lowering pass (`gradq_fx.passes.lower`) computes each op as its plan says, the report
(`gradq_fx.report`) renders the plans, and a statistics node of a layer whose wgrad falls back
to float records exact statistics. Planning is where the fallback rule times a GEMM
(`gradq_fx.fallback`), on the path the chosen lowering runs; nothing else measures.
"""

from __future__ import annotations

import dataclasses
import enum

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

from gradq_fx import fallback, lowerings, quantizer
from gradq_fx.config import (
    Clipping,
    Fallback,
    Lowering,
    Operand,
    Role,
    decode_operand,
    operand_bits,
)

KEY = "gradq_plan"
GEMM_OPS = (torch.ops.gradq.mm.default, torch.ops.gradq.conv2d.default)
STATS_OP = torch.ops.gradq.quantization_stats.default


class GemmKind(enum.Enum):
    """How a gradq GEMM runs, whatever the lowering."""

    INT8 = "int8"  # both operands at 8 bits: an INT8 GEMM of the plan's lowering
    FLOAT = "float"  # the config keeps this role in float
    SIMULATED = "simulated"  # IQS codebook: decoded operands, float GEMM
    FAKE_QUANT = "fake-quant"  # an operand below 8 bits: quantize, dequantize, float GEMM
    LSQ = "LSQ fake-quant"  # LSQ quantizers quantized the operands upstream: float GEMM
    FALLBACK = "float fallback"  # INT8 measured slower than float on this device


@dataclasses.dataclass(frozen=True)
class GemmPlan:
    op: str  # "gradq.mm" or "gradq.conv2d"
    role: Role
    module: str
    operands: tuple[Operand, Operand]
    specs: tuple[str, str]  # each operand's `QuantSpec.encode()`; "" = float
    kind: GemmKind
    lowering: Lowering  # the resolved lowering (never auto); it computes INT8 GEMMs
    speedup: float | None = None  # float time / INT8 time where measured

    @property
    def runs_in_int8(self) -> bool:
        return self.kind is GemmKind.INT8

    @property
    def widths(self) -> tuple[int, int]:
        """Each operand's integer width in bits (0 for a float operand)."""
        return tuple(operand_bits(spec) if spec else 0 for spec in self.specs)

    def describe(self) -> str:
        """The report's name for it: the lowering of an INT8 GEMM ("triton"), else the kind,
        with the operands' widths in the order W, A, G for fake quantization ("fake-quant
        W4A4", "W8G4" for its dgrad) or the measured ratio ("float fallback (INT8 0.62x)")."""
        if self.kind is GemmKind.INT8:
            return self.lowering.value
        if self.kind is GemmKind.FLOAT:
            return "float matmul"
        if self.kind is GemmKind.FALLBACK:
            return f"{self.kind.value} (INT8 {self.speedup:.2f}x)"
        if self.kind in (GemmKind.FAKE_QUANT, GemmKind.LSQ):
            named = zip(self.operands, self.widths, strict=True)
            order = list(Operand)
            ordered = sorted(named, key=lambda pair: order.index(pair[0]))
            return f"{self.kind.value} " + "".join(f"{o.value}{bits}" for o, bits in ordered)
        return self.kind.value


@dataclasses.dataclass(frozen=True)
class StatsPlan:
    module: str
    lowering: Lowering
    exact: bool  # the module's wgrad falls back to float: its gradient is used as it is


def run(
    graph: fx.Graph, lowering: Lowering = Lowering.AUTO, rule: Fallback = Fallback.NEVER
) -> list[GemmPlan | StatsPlan]:
    """Plan every gradq op of `graph` (module docstring); return the plans.

    lowering: the config's (`auto` resolves per device); rule: the config's fallback, where
    SLOWER times each INT8 GEMM of a measured lowering on CUDA and plans a slower one float.
    """
    plans: list[GemmPlan | StatsPlan] = []
    wgrads: dict[str, GemmPlan] = {}
    for node in _nodes(graph, GEMM_OPS):
        node.meta[KEY] = gemm_plan(node, lowering, rule)
        plans.append(node.meta[KEY])
        if node.meta[KEY].role is Role.WGRAD:
            wgrads[node.meta[KEY].module] = node.meta[KEY]
    for node in _nodes(graph, (STATS_OP,)):
        arguments = arguments_of(node)
        wgrad = wgrads.get(arguments["module"])
        exact = wgrad is not None and wgrad.kind is GemmKind.FALLBACK
        resolved = lowerings.resolve(lowering, arguments["x"].device).kind
        node.meta[KEY] = StatsPlan(arguments["module"], resolved, exact)
        plans.append(node.meta[KEY])
    return plans


def gemm_plan(node: fx.Node, lowering: Lowering, rule: Fallback) -> GemmPlan:
    """The plan of one gradq.mm or gradq.conv2d node."""
    arguments = arguments_of(node)
    chosen = lowerings.resolve(lowering, arguments["a"].device)
    specs = (arguments["a_spec"], arguments["b_spec"])
    kind, speedup = _kind(*specs), None
    if kind is GemmKind.INT8 and rule is Fallback.SLOWER and chosen.measured:
        speedup = fallback.speedup(chosen, node.target, arguments)
        if speedup is not None and speedup < 1:
            kind = GemmKind.FALLBACK
    return GemmPlan(
        op=str(node.target.overloadpacket).removeprefix("torch.ops."),
        role=Role(arguments["role"]),
        module=arguments["module"],
        operands=tuple(Operand(letter) for letter in arguments["operands"]),
        specs=specs,
        kind=kind,
        lowering=chosen.kind,
        speedup=speedup,
    )


def _kind(a_spec: str, b_spec: str) -> GemmKind:
    if not (a_spec and b_spec):
        return GemmKind.FLOAT
    a, b = decode_operand(a_spec), decode_operand(b_spec)  # None: quantized upstream (LSQ)
    if Clipping.IQS in (getattr(a, "clipping", None), getattr(b, "clipping", None)):
        return GemmKind.SIMULATED
    if None in (a, b):
        return GemmKind.LSQ
    if quantizer.is_fake_quantized(a, b):
        return GemmKind.FAKE_QUANT
    return GemmKind.INT8


def arguments_of(node: fx.Node) -> dict:
    """A gradq op node's arguments by name, each node replaced by its value (a fake tensor)."""
    normalized = normalize_function(
        node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
    )
    return {
        name: value.meta["val"] if isinstance(value, fx.Node) else value
        for name, value in normalized.kwargs.items()
    }


def ensure(graph: fx.Graph, lowering: Lowering, rule: Fallback) -> None:
    """Plan `graph` unless every gradq op of it has a plan already (the lowering pass plans
    a graph before the backend's report reads it)."""
    if not all(KEY in node.meta for node in _nodes(graph, (*GEMM_OPS, STATS_OP))):
        run(graph, lowering, rule)


def _nodes(graph: fx.Graph, targets) -> list[fx.Node]:
    return [n for t in targets for n in graph.find_nodes(op="call_function", target=t)]


def of(node: fx.Node) -> GemmPlan | StatsPlan:
    """The plan `run` stored on a gradq op node."""
    return node.meta[KEY]
