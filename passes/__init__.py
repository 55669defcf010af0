"""gradq's graph passes, in the order they run.

On Dynamo's graph (`prepare`): `inline` (nested compile regions), `annotate` (policy: what to
quantize and why), `rewrite` (mechanism: gradq's ops in place of the matmuls). On the joint
graph AOTAutograd derives: `lower` (each gradq op to its numerics, for Inductor).

Each stage runs under `timed`, so torch's compile-time metrics
(`torch._dynamo.utils.compile_times()`, the step benchmark's phases) show gradq's share.
"""

from __future__ import annotations

import contextlib

from torch import fx

from gradq_fx.config import GradQConfig
from gradq_fx.passes import annotate, inline, rewrite


def prepare(gm: fx.GraphModule, config: GradQConfig):
    """Run the Dynamo-graph passes in place; return annotate's decisions (one per matmul-like
    op, in every body gradq looks into)."""
    with timed("prepare"):
        inline.run(gm, config)
        decisions = annotate.run(gm, config)
        rewrite.run(gm, config)
    return decisions


def timed(stage: str) -> contextlib.AbstractContextManager:
    """Time a gradq stage among torch's compile metrics, as "gradq.<stage>"."""
    from torch._dynamo.utils import dynamo_timed

    return dynamo_timed(f"gradq.{stage}")
