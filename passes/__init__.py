"""gradq's graph passes, in the order they run.

On Dynamo's graph (`prepare`): `inline` (nested compile regions), `annotate` (policy: what to
quantize and why), `rewrite` (mechanism: gradq's ops in place of the matmuls). On the joint
graph AOTAutograd derives: `lower` (each gradq op to its numerics, for Inductor).
"""

from __future__ import annotations

from torch import fx

from gradq_fx.config import GradQConfig
from gradq_fx.passes import annotate, inline, rewrite


def prepare(gm: fx.GraphModule, config: GradQConfig):
    """Run the Dynamo-graph passes in place; return annotate's decisions (one per matmul-like
    op, in every body gradq looks into)."""
    inline.run(gm, config)
    decisions = annotate.run(gm, config)
    rewrite.run(gm, config)
    return decisions
