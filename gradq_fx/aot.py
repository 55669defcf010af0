"""AOTAutograd without Inductor: the one harness that `backend="gradq_eager"` and
`gradq_fx.report.capture` share.

    aot_eager(gm, inputs, on_graph)

derives the joint forward+backward graph of `gm` (or, without gradients, its inference
graph) with Inductor's decompositions, hands it to `on_graph` (which may change it in place:
the eager backend lowers it, the report records it), then partitions it with AOTAutograd's
default partitioner and runs each part op by op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import fx


def aot_eager(
    gm: fx.GraphModule, inputs: Sequence[Any], on_graph: Callable[[fx.GraphModule], None]
) -> Callable:
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
    from torch._functorch.partitioners import default_partition
    from torch._inductor.decomposition import select_decomp_table

    def partition(joint, joint_inputs, **kwargs):
        on_graph(joint)
        return default_partition(joint, joint_inputs, **kwargs)

    def inference(graph, _inputs):
        on_graph(graph)
        return make_boxed_func(graph.forward)

    return aot_module_simplified(
        gm,
        inputs,
        fw_compiler=lambda graph, _inputs: make_boxed_func(graph.forward),
        bw_compiler=lambda graph, _inputs: make_boxed_func(graph.forward),
        inference_compiler=inference,
        partition_fn=partition,
        decompositions=select_decomp_table(),
    )
