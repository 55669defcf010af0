"""Decide, for every matmul-like op of a Dynamo graph, whether gradq quantizes it, and why.

This pass only marks nodes (policy); `rewrite` acts on the marks (mechanism). It sets
`node.meta["gradq"]` to a `Decision` on every matmul-like node and leaves the graph as it was:

    before and after:  linear = torch._C._nn.linear(input=x, weight=w, bias=b)
    after, in meta:    Decision(kind=LINEAR, module="blocks.0.attn.qkv", quantize=True, ...)
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import operator
import re

import torch
import torch.nn.functional as F
from torch import fx

from gradq_fx.config import Attention, GradQConfig


class Kind(enum.Enum):
    LINEAR = "linear"  # F.linear, or a matmul with a weight operand
    MATMUL = "matmul"  # activation x activation (attention's explicit QK^T and PV)
    ATTENTION = "attention"  # fused F.scaled_dot_product_attention
    CONVOLUTION = "convolution"
    OTHER = "other"  # addmm, einsum, ...: matmul-like, not rewritten


@dataclasses.dataclass(frozen=True)
class Decision:
    node: str
    kind: Kind
    module: str
    quantize: bool
    reason: str


_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm, torch.mm}
_MATMUL_METHODS = {"matmul", "bmm", "mm", "__matmul__"}
_ATTENTION = {F.scaled_dot_product_attention}
_CONVOLUTION = {
    torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d,
    torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
}  # fmt: skip
_OTHER_FUNCTIONS = {torch.addmm, torch.baddbmm, torch.addbmm, torch.einsum, torch.bilinear}
_VIEW_METHODS = {"t", "transpose", "permute", "view", "reshape", "contiguous", "expand", "mT"}


def kind_of(node: fx.Node) -> Kind | None:
    """The matmul-like kind of a Dynamo graph node, or None for anything else."""
    if node.op == "call_function":
        target = node.target
        if target in _LINEAR:
            return Kind.LINEAR
        if target in _MATMUL_FUNCTIONS:
            return Kind.MATMUL
        if target in _ATTENTION:
            return Kind.ATTENTION
        if target in _CONVOLUTION:
            return Kind.CONVOLUTION
        if target in _OTHER_FUNCTIONS:
            return Kind.OTHER
    if node.op == "call_method" and node.target in _MATMUL_METHODS:
        return Kind.MATMUL
    return None


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module the node came from ('' at top level).

    Reads Dynamo's `nn_module_stack`, or for AOTAutograd's backward nodes the stack of the
    forward op they differentiate.
    """
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return re.sub(r"^L\['[^']*'\]\.?", "", path)


def parameter_of(node: fx.Node) -> torch.nn.Parameter | None:
    """The parameter a node reads (possibly behind view-like ops), if Dynamo recorded it."""
    while node.op == "call_method" and node.target in _VIEW_METHODS:
        node = node.args[0]
    if node.op != "placeholder":
        return None
    grapharg = node.meta.get("grapharg")
    example = grapharg.example if grapharg is not None else node.meta.get("example_value")
    return example if isinstance(example, torch.nn.Parameter) else None


def is_parameter(node: fx.Node) -> bool:
    """True if the node is a parameter placeholder or attribute, possibly behind view-like ops."""
    while node.op == "call_method" and node.target in _VIEW_METHODS:
        node = node.args[0]
    return node.op == "get_attr" or parameter_of(node) is not None


def _filter_reason(module: str, config: GradQConfig) -> str | None:
    """Why the include/exclude globs keep this module in float, or None if they do not."""
    if not any(fnmatch.fnmatchcase(module, pattern) for pattern in config.include):
        return f"not matched by include={list(config.include)}"
    for pattern in config.exclude:
        if fnmatch.fnmatchcase(module, pattern):
            return f"excluded by config (exclude pattern {pattern!r})"
    return None


def _operand_problem(node: fx.Node, kind: Kind) -> str | None:
    """Why the operands of a linear or matmul do not fit gradq's GEMMs, or None if they do."""
    if kind not in (Kind.LINEAR, Kind.MATMUL):
        return None
    values = [a.meta.get("example_value") for a in node.args[:2] if isinstance(a, fx.Node)]
    for value in values:
        if not isinstance(value, torch.Tensor):
            continue
        if not value.is_floating_point():
            return f"{value.dtype} operand: gradq quantizes floating-point GEMMs only"
        if kind is Kind.MATMUL and value.dim() < 2:
            return "matmul with a 1-D operand (a matrix-vector product): not rewritten"
    return None


def _decide(node: fx.Node, kind: Kind, config: GradQConfig) -> Decision:
    module = module_path(node)
    problem = _operand_problem(node, kind)
    if problem is not None:
        return Decision(node.name, kind, module, False, problem)
    if kind is Kind.MATMUL:
        if is_parameter(node.args[0]):
            reason = "matmul with a weight as left operand: not rewritten by gradq"
            return Decision(node.name, kind, module, False, reason)
        if is_parameter(node.args[1]):
            kind = Kind.LINEAR
    if kind is Kind.CONVOLUTION:
        return Decision(node.name, kind, module, False, "convolution: not rewritten by gradq")
    if kind is Kind.OTHER:
        reason = f"{getattr(node.target, '__name__', node.target)}: not rewritten by gradq"
        return Decision(node.name, kind, module, False, reason)
    if kind in (Kind.MATMUL, Kind.ATTENTION) and config.attention is Attention.FLOAT:
        return Decision(node.name, kind, module, False, "attention kept float (attention='float')")
    reason = _filter_reason(module, config)
    if reason is not None:
        return Decision(node.name, kind, module, False, reason)
    return Decision(node.name, kind, module, True, "int8")


def run(gm: fx.GraphModule, config: GradQConfig) -> list[Decision]:
    """Mark every matmul-like node with its Decision; return them in graph order."""
    decisions = []
    for node in gm.graph.nodes:
        kind = kind_of(node)
        if kind is None:
            continue
        node.meta["gradq"] = decision = _decide(node, kind, config)
        decisions.append(decision)
    gm.graph.lint()
    return decisions
