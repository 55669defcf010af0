"""The bodies of higher-order ops: where Dynamo puts the code it does not inline.

Dynamo hands some code to the backend as a body `GraphModule` run by a higher-order op
(`torch.ops.higher_order.*`) instead of as nodes of the top graph. What gradq does in each:

- rewritten like the top graph (`REWRITTEN`): activation checkpointing
  (`tag_activation_checkpoint`: `torch.utils.checkpoint`, reentrant or not, timm's
  `set_grad_checkpointing`, selective checkpointing with a policy) and nested compile
  regions (`invoke_subgraph`: `torch.compiler.nested_compile_region`). AOTAutograd traces
  these bodies as it traces the top graph, so the gradq ops put there reach the joint graph;
- left in float, with the reason (`float_reason`): every other higher-order op's bodies
  (`cond` branches, `while_loop`, `map`, `scan`, a user's `autograd.Function`, flex
  attention's score and mask functions).

A body's placeholders are the operands its op passes in, in order, from a fixed position of
the op's arguments (`OPERANDS_FROM`): `scopes(gm)` walks every body, however nested, and
records for each placeholder the node of the enclosing graph that feeds it.

    top graph:  wrap_body_0 = self.wrap_body_0
                out = torch.ops.higher_order.tag_activation_checkpoint(wrap_body_0, x, w, b)
    its body:   x = placeholder; w = placeholder; b = placeholder
                linear = torch._C._nn.linear(x, w, b)      <- a scope of its own; w -> w
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import fx

_HOP = torch.ops.higher_order

# The higher-order ops whose bodies gradq rewrites -> the index of their first operand (the
# value of the body's first placeholder); the body is their first GraphModule argument.
OPERANDS_FROM = {
    _HOP.tag_activation_checkpoint: 1,  # (body, *operands, **checkpoint kwargs)
    _HOP.invoke_subgraph: 2,  # (body, identifier, *operands)
}
REWRITTEN = frozenset(OPERANDS_FROM)

# What the report and the warning say of the matmuls in other ops' bodies.
_WHY = {
    "cond": "inside torch.cond: gradq does not rewrite control-flow branches",
    "while_loop": "inside torch.while_loop: gradq does not rewrite loop bodies",
    "map_impl": "inside a map: gradq does not rewrite mapped bodies",
    "scan": "inside torch.scan: gradq does not rewrite scanned bodies",
    "associative_scan": "inside an associative_scan: gradq does not rewrite its combine body",
    "autograd_function_apply": (
        "inside a custom torch.autograd.Function: its backward is the user's, gradq does not "
        "rewrite it"
    ),
    "flex_attention": "inside flex_attention's score or mask function: not rewritten by gradq",
}


def hop_name(target) -> str:
    """'cond' for torch.ops.higher_order.cond (the op's registered name)."""
    return getattr(target, "__name__", None) or str(target)


def is_hop(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)


def float_reason(target) -> str:
    """Why the matmuls in a body of the higher-order op `target` stay float."""
    name = hop_name(target)
    return _WHY.get(name, f"inside torch.ops.higher_order.{name}: gradq does not rewrite it")


def body_nodes(node: fx.Node) -> list[fx.Node]:
    """The get_attr nodes of the GraphModules a higher-order op node runs, in argument order."""
    module = node.graph.owning_module
    return [
        n
        for n in node.all_input_nodes
        if n.op == "get_attr" and isinstance(_attribute(module, n.target), fx.GraphModule)
    ]


def _attribute(module: torch.nn.Module, target: str):
    for name in target.split("."):
        module = getattr(module, name, None)
    return module


@dataclasses.dataclass(eq=False)
class Scope:
    """One graph gradq looks into: the top graph, or the body of a higher-order op.

    call: the higher-order op node that runs this body (None for the top graph); parent: the
    scope that node sits in; operands: each of the body's placeholders -> the parent's node
    that feeds it (empty where the op is not one gradq rewrites); reason: why the matmuls of
    this body stay float (None where gradq rewrites them).
    """

    module: fx.GraphModule
    call: fx.Node | None = None
    parent: Scope | None = None
    operands: Mapping[fx.Node, fx.Node] = dataclasses.field(default_factory=dict)
    reason: str | None = None

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph

    @property
    def top(self) -> Scope:
        return self if self.parent is None else self.parent.top

    @property
    def region(self) -> str:
        """The names of the higher-order op nodes that run this body, outermost first, joined
        by '/' ("" for the top graph)."""
        if self.parent is None:
            return ""
        outer = self.parent.region
        return f"{outer}/{self.call.name}" if outer else self.call.name

    def outer(self, node: fx.Node) -> tuple[fx.Node, Scope] | None:
        """The node of the enclosing graph that feeds placeholder `node`, with its scope."""
        if self.parent is None or node not in self.operands:
            return None
        return self.operands[node], self.parent

    def placeholders(self) -> list[fx.Node]:
        return list(self.graph.find_nodes(op="placeholder"))


def scopes(gm: fx.GraphModule) -> list[Scope]:
    """The top graph and every body below it, parents before their bodies."""
    top = Scope(gm)
    found = [top]
    for scope in found:  # grows as bodies are found
        for node in scope.graph.nodes:
            if not is_hop(node):
                continue
            for index, body in enumerate(body_nodes(node)):
                module = _attribute(scope.module, body.target)
                found.append(_body_scope(module, node, scope, first=index == 0))
    return found


def _body_scope(module: fx.GraphModule, call: fx.Node, parent: Scope, first: bool) -> Scope:
    inherited = parent.reason
    start = OPERANDS_FROM.get(call.target)
    if inherited is not None or start is None or not first:
        return Scope(module, call, parent, {}, inherited or float_reason(call.target))
    placeholders = list(module.graph.find_nodes(op="placeholder"))
    operands = call.args[start:]
    if len(operands) != len(placeholders):
        reason = (
            f"inside torch.ops.higher_order.{hop_name(call.target)} with {len(operands)} operands "
            f"for {len(placeholders)} body inputs: not rewritten by gradq"
        )
        return Scope(module, call, parent, {}, reason)
    return Scope(module, call, parent, dict(zip(placeholders, operands, strict=True)))


def thread(value: fx.Node, scope: Scope) -> fx.Node:
    """A node of `scope`'s graph carrying `value`, a node of the top graph: the body gets a new
    last placeholder and its op a new last operand, level by level from the top.

    For a value that only the body needs (a statistics probe), added once per body.
    """
    if scope.parent is None:
        return value
    outer = thread(value, scope.parent)
    for placeholder, operand in scope.operands.items():
        if operand is outer:
            return placeholder
    placeholders = scope.placeholders()
    where = (
        scope.graph.inserting_after(placeholders[-1])
        if placeholders
        else scope.graph.inserting_before(next(iter(scope.graph.nodes)))
    )
    with where:
        placeholder = scope.graph.placeholder(value.name)
    if "example_value" in value.meta:
        placeholder.meta["example_value"] = value.meta["example_value"]
    scope.call.args = (*scope.call.args, outer)
    scope.operands = {**scope.operands, placeholder: outer}
    return placeholder
