"""Inline nested compile regions: each `invoke_subgraph` call becomes its body's nodes.

`torch.compiler.nested_compile_region` makes Dynamo trace a repeated block once: every call
becomes an `invoke_subgraph` of one shared body, whose nodes carry the module path of the
instance Dynamo traced (blocks.0). gradq's decisions, report rows and statistics probes are
per module, so this pass puts a copy of the body in place of each call, its nodes' module
paths moved to the instance that call runs (read off the call's own `nn_module_stack`):

    before:  subgraph_0 = self.subgraph_0
             invoke_subgraph = invoke_subgraph(subgraph_0, "subgraph_0", x, w0, b0)
             y = invoke_subgraph[0]
             subgraph_1 = self.subgraph_0
             invoke_subgraph_1 = invoke_subgraph(subgraph_1, "subgraph_0", y, w1, b1)
             z = invoke_subgraph_1[0]
    after:   linear = torch._C._nn.linear(x, w0, b0); relu = torch.relu(linear)   (blocks.0)
             linear_1 = torch._C._nn.linear(relu, w1, b1); relu_1 = torch.relu(linear_1)
                                                                                   (blocks.1)
             (users of y read relu, users of z read relu_1)

The model then compiles as if the region were not marked: the same numbers, one compiled
copy per call.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from gradq_fx.passes.annotate import moved_path
from gradq_fx.passes.subgraphs import scopes

_INVOKE = torch.ops.higher_order.invoke_subgraph


def _path(node: fx.Node) -> str | None:
    """The module path of the innermost module a node runs in (Dynamo's spelling), if any."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def _moved(stack: dict, old: str, new: str) -> dict:
    """nn_module_stack with every path under `old` moved under `new`."""
    return {key: (moved_path(path, old, new), kind) for key, (path, kind) in stack.items()}


def _inline(graph: fx.Graph, call: fx.Node, body: fx.GraphModule, traced: str | None) -> None:
    """Replace `call` (and its getitems) by a copy of `body`'s nodes, paths moved from `traced`
    (the instance the body was traced for) to the call's own."""
    placeholders = list(body.graph.find_nodes(op="placeholder"))
    values = dict(zip(placeholders, call.args[2:], strict=True))
    with graph.inserting_before(call):
        outputs = graph.graph_copy(body.graph, values)
    here = _path(call)
    if traced is not None and here is not None and here != traced:
        for node in body.graph.nodes:
            copied = values.get(node)
            if copied is not None and node.op != "placeholder" and "nn_module_stack" in copied.meta:
                copied.meta["nn_module_stack"] = _moved(
                    copied.meta["nn_module_stack"], traced, here
                )
    for user in list(call.users):
        if user.target is not operator.getitem:
            raise ValueError(f"inline: {call.name} is read by {user.name}, not by indexing")
        user.replace_all_uses_with(outputs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(call)


def run(gm: fx.GraphModule, config=None) -> int:
    """Inline every invoke_subgraph call, however nested; return how many were inlined.
    `config` is unused (every pass takes one)."""
    inlined = 0
    while calls := [
        (scope, node)
        for scope in scopes(gm)
        for node in scope.graph.find_nodes(op="call_function", target=_INVOKE)
    ]:
        traced: dict[tuple[fx.GraphModule, str], str | None] = {}
        for scope, node in calls:
            attribute = node.args[0]
            # The first call of a body in graph order is the instance Dynamo traced it for.
            key = (scope.module, attribute.target)
            traced.setdefault(key, _path(node))
            _inline(scope.graph, node, getattr(scope.module, attribute.target), traced[key])
            if not attribute.users:
                scope.graph.erase_node(attribute)
            inlined += 1
        for module, target in traced:
            if not module.graph.find_nodes(op="get_attr", target=target):
                module.delete_submodule(target)
        for scope in scopes(gm):
            scope.graph.lint()
            scope.module.recompile()
    return inlined
