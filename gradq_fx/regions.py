"""Compile each repeated block once: the rewritten graph, split at its blocks, one compile per
distinct block.

A ViT is a stack of blocks that run the same code on their own weights. Dynamo hands the
backend one graph with every block's nodes in it, and Inductor would generate and compile
each block's code again. Here the rewritten Dynamo graph is split into pieces, one per block
instance (the nodes that ran inside `blocks.3`) and one per run of other nodes between them
(patch embedding, head), and each piece is compiled on its own (AOTAutograd, gradq's lowering,
Inductor). Two pieces share one compile when they are the same code: the same nodes, the same
input shapes, strides and dtypes, and the same gradq decisions once each instance's module
path is read as a placeholder. Since weights are inputs of Dynamo's graph, one compiled piece
runs every instance on that instance's weights:

    before:  x = patch_embed(...); x = block(x, w0...)   (blocks.0)
             x = block(x, w1...)                          (blocks.1) ... head(x)
    after:   x = piece_0(...)                             (compiled)
             x = piece_1(x, w0...)                        (compiled once)
             x = piece_1(x, w1...)                        (the same compiled code)
             ... piece_n(x, ...)                          (compiled)

What stays per instance: the report's rows (the compiled piece's rows, each module path
moved to the instance's), the statistics probes (`stats=True`: attributes of the graph,
which become inputs of the pieces like the weights), and anything that makes an instance
different code: a block excluded by a glob has no gradq ops where its siblings have them,
so it compiles on its own.

The numbers are those of compiling the whole graph: each piece computes its nodes as the
whole graph would (Inductor keeps each output's strides, `keep_output_stride`); only fusions
across a block's boundary are given up, which change no value at float32.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from gradq_fx.passes.annotate import dotted, moved_path
from gradq_fx.report import Report

# (compiled callable, its report)
Compiled = tuple[Callable[..., Any], Report]
Compiler = Callable[[fx.GraphModule, Sequence[Any]], Compiled]

log = logging.getLogger("gradq_fx")

_INSTANCE = re.compile(r"^(?P<container>.*)\.(?P<index>\d+)$")


def _chain(node: fx.Node) -> list[tuple[str, type | str]]:
    """(module path, class) of each module the node ran in, outermost first ('' is the model)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(dotted(path), kind) for path, kind in stack.values()]


def _signature(nodes: list[fx.Node]) -> tuple:
    """What a block's nodes compute, cheaply: each node's op and target and its output shape."""
    out = []
    for node in nodes:
        value = node.meta.get("example_value")
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        out.append((node.op, str(node.target), str(shape)))
    return tuple(out)


def instances(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """The repeated block each node runs in ('blocks.3'), for the nodes inside one.

    A block instance is a child of a container (`ModuleList`, `Sequential`: a path ending in
    an index) whose class and node signature a sibling shares. For each node the outermost
    such instance on its module chain wins; an instance none of whose siblings repeats it
    (Swin's stages differ in width) is looked into, so the blocks inside it are found.
    """
    compute = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    members: dict[str, list[fx.Node]] = {}
    kinds: dict[str, type | str] = {}
    for node in compute:
        for path, kind in _chain(node):
            if _INSTANCE.match(path):
                members.setdefault(path, []).append(node)
                kinds[path] = kind
    # Siblings that repeat: the same container, class and signature.
    groups: dict[tuple, list[str]] = {}
    for path, nodes in members.items():
        container = _INSTANCE.match(path)["container"]
        groups.setdefault((container, str(kinds[path]), _signature(nodes)), []).append(path)
    repeated = {path for paths in groups.values() if len(paths) > 1 for path in paths}
    # Siblings of a repeated instance are pieces too (an excluded block, the last block of a
    # stage that differs): they sit in the same place of the model.
    containers = {_INSTANCE.match(path)["container"] for path in repeated}
    chosen = {p for p in members if _INSTANCE.match(p)["container"] in containers}
    found: dict[fx.Node, str] = {}
    for node in compute:
        for path, _kind in _chain(node):
            if path in chosen:
                found[node] = path
                break
    return found


def _partitions(
    gm: fx.GraphModule, found: dict[fx.Node, str]
) -> tuple[dict[fx.Node, int], list[str | None]]:
    """Each node's piece, and each piece's block instance (None between blocks): a new piece
    wherever the instance (or the absence of one) changes, in graph order, so pieces only
    read pieces before them."""
    partition: dict[fx.Node, int] = {}
    paths: list[str | None] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue  # inputs of the pieces that read them (split_module's rule)
        here = found.get(node)
        if not paths or paths[-1] != here:
            paths.append(here)
        partition[node] = len(paths) - 1
    return partition, paths


def _fingerprint(piece: fx.GraphModule, inputs: Sequence[Any], path: str | None) -> tuple:
    """Equal for two pieces that are the same code on inputs of the same layout: nodes with
    their targets and constants (module paths under the instance's read as '<block>'), and
    each input's shape, strides, dtype, device and requires_grad."""
    index = {node: i for i, node in enumerate(piece.graph.nodes)}

    def constant(value: Any) -> str:
        text = repr(value)
        if path is not None:
            # Module paths appear in gradq's op arguments (sites name their layer).
            text = re.sub(re.escape(path) + r"(?=[.\]'\"]|$)", "<block>", text)
        return text

    def argument(value: Any) -> str:
        mapped = fx.node.map_aggregate(
            value, lambda v: f"%{index[v]}" if isinstance(v, fx.Node) else constant(v)
        )
        return repr(mapped)

    # A placeholder is named after the value that feeds it (each block's own weights): only
    # its position counts.
    nodes = tuple(
        (node.op, "" if node.op == "placeholder" else str(node.target))
        + (argument(node.args), argument(node.kwargs))
        for node in piece.graph.nodes
    )
    layouts = tuple(
        (tuple(map(str, t.shape)), tuple(map(str, t.stride())), t.dtype, t.device, t.requires_grad)
        if isinstance(t, torch.Tensor)
        else repr(t)
        for t in inputs
    )
    return nodes, layouts


def _rename_report(found: Report, old: str, new: str) -> Report:
    """The report of a piece compiled for instance `old`, as instance `new` runs it."""
    gemms = tuple(
        dataclasses.replace(row, module=moved_path(row.module, old, new)) for row in found.gemms
    )
    float_ops = tuple(
        dataclasses.replace(op, module=moved_path(op.module, old, new)) for op in found.float_ops
    )
    return dataclasses.replace(found, gemms=gemms, float_ops=float_ops)


def _merge(reports: Sequence[Report]) -> Report:
    """One report of the pieces' reports, its rows in the order the whole graph's report
    lists them: the forward's in piece order, then the backward's, which runs the pieces
    last to first."""

    def in_run_order(rows_of):
        forward = [row for found in reports for row in rows_of(found) if row.graph == "fwd"]
        backward = [
            row for found in reversed(reports) for row in rows_of(found) if row.graph != "fwd"
        ]
        return tuple(forward + backward)

    return dataclasses.replace(
        reports[0],
        training=any(found.training for found in reports),
        gemms=in_run_order(lambda found: found.gemms),
        float_ops=in_run_order(lambda found: found.float_ops),
    )


class _Piece(torch.nn.Module):
    """Runs a compiled piece where the split graph calls the piece's module."""

    def __init__(self, compiled: Callable[..., Any], single_output: bool):
        super().__init__()
        self.compiled = compiled
        self.single_output = single_output

    def forward(self, *args: Any) -> Any:
        out = self.compiled(*args)
        return out[0] if self.single_output else out


@dataclasses.dataclass(frozen=True)
class Split:
    """What `compile_blocks` did: how many pieces, how many compiles, and the merged report."""

    module: torch.nn.Module
    report: Report
    pieces: int
    compiled: int


def compile_blocks(
    gm: fx.GraphModule, example_inputs: Sequence[Any], compile_piece: Compiler
) -> Split | None:
    """Split `gm` at its repeated blocks and compile each distinct piece once with
    `compile_piece`; None when `gm` has no repeated block (compile it whole)."""
    found = instances(gm)
    if not found:
        return None
    missing = [
        n.name
        for n in gm.graph.nodes
        if n.op not in ("placeholder", "get_attr", "output") and "example_value" not in n.meta
    ]
    if missing:  # a piece's inputs are these values: without them, compile the graph whole
        log.info("gradq: no example value for %s; the graph compiles whole", missing[:3])
        return None
    by_name = {node.name: node for node in gm.graph.nodes}
    # A piece's placeholder is named after the node of `gm` that feeds it: one of gm's inputs
    # (given as Dynamo gave it: a real tensor, a Parameter for a weight), an attribute of gm
    # (a statistics probe), or a value another piece computes (Dynamo's fake tensor of it).
    given = dict(zip(gm.graph.find_nodes(op="placeholder"), example_inputs, strict=True))

    def example(name: str) -> Any:
        node = by_name[name]
        if node in given:
            return given[node]
        if node.op == "get_attr":
            return getattr(gm, node.target)
        return node.meta["example_value"]

    partition, paths = _partitions(gm, found)
    split = split_module(gm, gm, lambda node: partition[node], keep_original_order=True)
    cache: dict[tuple, tuple[Callable[..., Any], Report, str | None]] = {}
    reports: list[Report] = []
    for call in split.graph.find_nodes(op="call_module"):
        piece = getattr(split, call.target)
        inputs = [example(p.name) for p in piece.graph.find_nodes(op="placeholder")]
        output = piece.graph.output_node()
        single = not isinstance(output.args[0], (tuple, list))
        if single:  # AOTAutograd returns a tuple; the split graph reads one value
            output.args = ((output.args[0],),)
            piece.recompile()
        path = paths[int(call.target.removeprefix("submod_"))]  # split_module's naming
        key = _fingerprint(piece, inputs, path)
        if key in cache:
            compiled, piece_report, traced = cache[key]
            if traced is not None and path is not None:
                piece_report = _rename_report(piece_report, traced, path)
        else:
            compiled, piece_report = compile_piece(piece, inputs)
            cache[key] = (compiled, piece_report, path)
        reports.append(piece_report)
        setattr(split, call.target, _Piece(compiled, single))
    split.recompile()
    return Split(split, _merge(reports), len(reports), len(cache))
