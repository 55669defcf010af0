"""lower: every gradq.mm of a joint graph becomes the reference numerics; the uuid is honest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradq_fx import plan
from gradq_fx.config import GradQConfig, Lowering
from gradq_fx.passes import lower
from gradq_fx.report import capture


def two_linears() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.GELU(), torch.nn.Linear(17, 5))


def count(graph, target) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target == target)


def gemms_by_operands(graph) -> tuple[int, int]:
    """(float GEMMs, reference int8 GEMMs): on the CPU the exact int8 GEMM is a float32 GEMM
    of the int8 codes converted to float (kernels/int_mm.py)."""

    def from_int8(source) -> bool:
        return (
            source.target is torch.ops.prims.convert_element_type.default
            and source.args[0].meta["val"].dtype == torch.int8
        )

    targets = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default)
    of_codes = [
        all(from_int8(source) for source in node.args[:2])
        for node in graph.nodes
        if node.op == "call_function" and node.target in targets
    ]
    return of_codes.count(False), of_codes.count(True)


def test_lowers_every_gradq_gemm_of_the_joint_graph():
    model = two_linears()
    config = GradQConfig.from_options({"wgrad": False})
    x = torch.randn(7, 13, requires_grad=True)  # so the first layer has a dgrad too
    (captured,) = capture(model, (x,), config, training=True)
    graph = captured.graph.graph
    gradq_nodes = [n for n in graph.nodes if n.target is torch.ops.gradq.mm.default]
    quantized = [n for n in gradq_nodes if n.args[3] and n.args[4]]
    assert len(gradq_nodes) == 6 and len(quantized) == 4  # 2 forward, 2 dgrad, 2 float wgrad

    # Inductor runs the pass under the graph's fake mode; do the same here.
    fake_mode = torch._guards.detect_fake_mode([n.meta.get("val") for n in graph.nodes])
    with fake_mode:
        assert lower.run(graph) == 6
    assert count(graph, torch.ops.gradq.mm.default) == 0

    # The two float wgrads, and the 4 quantized GEMMs as the reference's int8 GEMMs.
    assert gemms_by_operands(graph) == (len(gradq_nodes) - len(quantized), len(quantized))
    for node in graph.nodes:
        if node.op == "call_function":
            assert "val" in node.meta, node


def test_uuid_hashes_the_source_of_numerics_ops_passes_and_kernels(tmp_path, monkeypatch):
    names = {path.name for path in lower.source_files()}
    assert {"ops.py", "config.py", "lower.py", "rewrite.py", "int_mm.py", "plan.py"} <= names
    assert {"reference.py", "triton.py", "fused.py"} <= names  # the lowerings' package
    before = lower.LowerPass().uuid()
    assert before == lower.LowerPass().uuid()
    # A changed source file changes the uuid (the FX graph cache must not serve stale code).
    numerics = Path(plan.__file__)
    copy = tmp_path / numerics.name
    copy.write_text(numerics.read_text() + "\n# changed\n")
    files = [copy if p == numerics else p for p in lower.source_files()]
    monkeypatch.setattr(lower, "source_files", lambda: files)
    lower.source_hash.cache_clear()
    try:
        assert lower.LowerPass().uuid() != before
    finally:
        lower.source_hash.cache_clear()


# --- lowerings -------------------------------------------------------------------------------


def lowered_graph(model, x, options, lowering: Lowering):
    """The joint graph of `model` on `x` with gradq's rewrite, lowered as `lowering` says."""
    (captured,) = capture(model, (x,), GradQConfig.from_options(options), training=True)
    graph = captured.graph.graph
    fake_mode = torch._guards.detect_fake_mode([n.meta.get("val") for n in graph.nodes])
    with fake_mode:
        lower.run(graph, lowering)
    return graph


def test_triton_lowering_puts_the_fused_kernels_in_the_graph():
    model = two_linears()
    x = torch.randn(7, 13, requires_grad=True)
    graph = lowered_graph(model, x, {}, Lowering.TRITON)
    # 2 layers x (forward, dgrad, wgrad) = 6 GEMMs, each quantizing both of its operands.
    assert count(graph, torch.ops.gradq.int8_scaled_mm.default) == 6
    assert count(graph, torch.ops.gradq.quantize_rows.default) == 12
    assert count(graph, torch.ops.gradq.mm.default) == 0
    assert gemms_by_operands(graph)[1] == 0  # no reference int8 GEMM left
    reference = lowered_graph(model, x, {}, Lowering.REFERENCE)
    assert count(reference, torch.ops.gradq.int8_scaled_mm.default) == 0


def test_fused_lowering_leaves_the_quantize_to_inductor():
    model = two_linears()
    x = torch.randn(7, 13, requires_grad=True)
    graph = lowered_graph(model, x, {}, Lowering.FUSED)
    assert count(graph, torch.ops.gradq.int8_scaled_mm.default) == 6
    assert count(graph, torch.ops.gradq.quantize_rows.default) == 0
    # Per-row iqr clips keep their kernel: the 4 gradient operands' (2 layers x dgrad,
    # wgrad); each of the 12 operands' rounding is a plain aten op.
    assert count(graph, torch.ops.gradq.iqr_clip_rows.default) == 4
    triton = lowered_graph(model, x, {}, Lowering.TRITON)
    rounds = count(graph, torch.ops.aten.round.default)
    assert rounds - count(triton, torch.ops.aten.round.default) == 12
    assert gemms_by_operands(graph)[1] == 0


def test_uuid_names_the_lowering():
    assert lower.LowerPass(Lowering.TRITON).uuid() != lower.LowerPass(Lowering.REFERENCE).uuid()


def train_step(model, x, options):
    """Output and every gradient of loss = sum(out * probe), through gradq_eager."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = torch.compile(model, backend="gradq_eager", options=options, fullgraph=True)(x)
    probe = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * probe).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return [out.detach(), x.grad.clone(), *grads]


class TinyAttention(torch.nn.Module):
    """Linear layers and an explicit attention (batched GEMMs), at awkward sizes."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(19, 3 * 2 * 5)
        self.proj = torch.nn.Linear(10, 7)

    def forward(self, x):  # x [B, N, 19]
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 5)).permute(2, 0, 3, 1, 4)
        scores = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(scores.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("lowering", ["triton", "fused"])
@pytest.mark.parametrize("scaling", [False, True])
@pytest.mark.parametrize("granularity", ["per_row", "per_tensor"])
def test_kernel_lowerings_match_the_reference_lowering(scaling, lowering, granularity):
    torch.manual_seed(0)
    model = TinyAttention()
    x = torch.randn(3, 23, 19)
    x[0, 5] *= 50  # an outlier token
    base = {"attention": "int8", "gradient_scaling": scaling}
    base |= {f"{operand}_granularity": granularity for operand in ("weight", "gradient")}
    expected = train_step(model, x, {**base, "lowering": "reference"})
    actual = train_step(model, x, {**base, "lowering": lowering})
    # On the CPU the kernels' ops run their torch references, so the two lowerings must give
    # the same bits; the Triton kernels themselves are held to those references in
    # tests/kernels (bit for bit, least-squares scales to float rounding). One exception: a
    # per-tensor least-squares scale sums <x, q> over b's elements in b^T's order there, in
    # b's order in the reference (seen: 1 ulp on one weight gradient).
    for want, got in zip(expected, actual, strict=True):
        if scaling and granularity == "per_tensor":
            ulps = 4 * torch.finfo(torch.float32).eps * want.abs().max()
            torch.testing.assert_close(got, want, rtol=0, atol=ulps)
        else:
            assert torch.equal(got, want)
