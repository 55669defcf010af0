"""lower: every gradq.mm of a joint graph becomes the reference numerics; the uuid is honest."""

from __future__ import annotations

from pathlib import Path

import torch

from gradq_fx import quantizer
from gradq_fx.config import GradQConfig
from gradq_fx.passes import lower
from gradq_fx.report import _capture


def count(graph, target) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target == target)


def test_lowers_every_gradq_gemm_of_the_joint_graph():
    model = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.GELU(), torch.nn.Linear(17, 5))
    config = GradQConfig.from_options({"wgrad": False})
    x = torch.randn(7, 13, requires_grad=True)  # so the first layer has a dgrad too
    (captured,) = _capture(model, (x,), config, training=True)
    graph = captured.graph.graph
    gradq_nodes = [n for n in graph.nodes if n.target is torch.ops.gradq.mm.default]
    quantized = [n for n in gradq_nodes if n.args[3] and n.args[4]]
    assert len(gradq_nodes) == 6 and len(quantized) == 4  # 2 forward, 2 dgrad, 2 float wgrad

    # Inductor runs the pass under the graph's fake mode; do the same here.
    fake_mode = torch._guards.detect_fake_mode([n.meta.get("val") for n in graph.nodes])
    with fake_mode:
        assert lower.run(graph) == 6
    assert count(graph, torch.ops.gradq.mm.default) == 0
    # On the CPU the exact int8 GEMM is one float32 bmm over K-chunks (kernels/int_mm.py).
    assert count(graph, torch.ops.aten.bmm.default) == len(quantized)
    for node in graph.nodes:
        if node.op == "call_function":
            assert "val" in node.meta, node


def test_uuid_hashes_the_source_of_numerics_ops_passes_and_kernels(tmp_path, monkeypatch):
    names = {path.name for path in lower.source_files()}
    assert {"quantizer.py", "ops.py", "config.py", "lower.py", "rewrite.py", "int_mm.py"} <= names
    before = lower.LowerPass().uuid()
    assert before == lower.LowerPass().uuid()
    # A changed source file changes the uuid (the FX graph cache must not serve stale code).
    copy = tmp_path / "quantizer.py"
    copy.write_text(Path(quantizer.__file__).read_text() + "\n# changed\n")
    files = [copy if p.name == "quantizer.py" else p for p in lower.source_files()]
    monkeypatch.setattr(lower, "source_files", lambda: files)
    lower.source_hash.cache_clear()
    try:
        assert lower.LowerPass().uuid() != before
    finally:
        lower.source_hash.cache_clear()
