"""Matmuls inside the bodies of higher-order ops: rewritten where gradq can, named where not.

Activation checkpointing (timm's `set_grad_checkpointing`, reentrant and non-reentrant
`torch.utils.checkpoint`, selective checkpointing with a policy) and nested compile regions
must keep every GEMM of the model in INT8, with the same numbers as without them; the
matmuls of bodies gradq does not rewrite (a `torch.cond` branch, a custom autograd.Function,
flex attention) must appear in the report and in a compile-time warning, with their reason.
The references: the same model without checkpointing or regions, and eager float.
"""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import gradq_fx
from gradq_fx.bench.step import saved_bytes
from gradq_fx.passes.annotate import Reason
from gradq_fx.report import report


def deit() -> torch.nn.Module:
    """A 2-block DeiT-tiny at 32 px with 8 px patches (17 tokens): seconds to trace."""
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10
    )


class Checkpointed(torch.nn.Module):
    """A block run under torch.utils.checkpoint with the given keyword arguments."""

    def __init__(self, block: torch.nn.Module, **kwargs):
        super().__init__()
        self.block = block
        self.kwargs = kwargs

    def forward(self, x):
        return checkpoint(self.block, x, **self.kwargs)


def save_gemm_outputs(ctx, op, *args, **kwargs):
    """A selective-checkpointing policy: keep gradq's GEMM outputs, recompute the rest."""
    if op is torch.ops.gradq.mm.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


SELECTIVE = functools.partial(create_selective_checkpoint_contexts, save_gemm_outputs)


def checkpointed(style: str) -> torch.nn.Module:
    model = deit()
    if style == "timm":
        model.set_grad_checkpointing(True)
        return model
    kwargs = {
        "reentrant": {"use_reentrant": True},
        "non_reentrant": {"use_reentrant": False},
        "selective": {"use_reentrant": False, "context_fn": SELECTIVE},
    }[style]
    model.blocks = torch.nn.Sequential(*(Checkpointed(b, **kwargs) for b in model.blocks))
    return model


def roles(found) -> dict:
    """(role, graph) -> INT8 GEMM FLOPs: comparable across module renamings."""
    out = {}
    for row in found.int8_gemms:
        out[(row.role, row.graph)] = out.get((row.role, row.graph), 0) + row.flops
    return out


STYLES = ["timm", "reentrant", "non_reentrant", "selective"]


@pytest.mark.parametrize("style", STYLES)
def test_checkpointing_keeps_every_gemm_in_int8(style):
    x = torch.randn(2, 3, 32, 32)
    plain = report(deit(), x)
    found = report(checkpointed(style), x)
    assert plain.coverage()["total"]["ratio"] > 0.95
    assert found.coverage() == plain.coverage()
    assert roles(found) == roles(plain)
    assert len(found.gemms) == len(plain.gemms)
    if style == "timm":  # same module paths: the rows name the real modules
        assert {(r.module, r.role) for r in found.gemms} == {
            (r.module, r.role) for r in plain.gemms
        }
    # Only attention stays float (attention='float'), by the options, not unreachable.
    assert {op.code for op in found.float_ops} == {Reason.CONFIG.value}


def training_step(model: torch.nn.Module, options: dict):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="gradq_eager", options=options)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)

    def step():
        model.zero_grad()
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        return loss

    loss = step()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}
    stats = {name: s.cosine.item() for name, s in gradq_fx.layer_stats(model).items()}
    return loss.item(), grads, stats, saved_bytes(step, list(model.parameters()))


@pytest.mark.parametrize("style", ["timm", "selective"])
def test_checkpointed_training_recomputes_the_same_quantized_forward(style):
    options = {"stats": True}
    plain_loss, plain_grads, plain_stats, plain_saved = training_step(deit(), options)
    model = checkpointed(style)
    loss, grads, stats, saved = training_step(model, options)
    assert loss == plain_loss
    renamed = {name.replace(".block.", "."): grad for name, grad in grads.items()}
    assert renamed.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.equal(renamed[name], grad), name  # bit for bit: the same INT8 forward
    assert {k.replace(".block.", "."): v for k, v in stats.items()} == plain_stats
    assert len(plain_stats) == 10  # the patch embedding, 4 Linears per block, the head
    assert saved < plain_saved  # checkpointing keeps less for backward


class Nested(torch.nn.Module):
    """Three blocks marked as one nested compile region, then a head."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)

        @torch.compiler.nested_compile_region
        def forward(self, x):
            return F.gelu(self.fc(x))

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Nested.Block() for _ in range(3)])
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_nested_compile_regions_are_rewritten_per_instance():
    torch.manual_seed(0)
    model = Nested()
    x = torch.randn(8, 16, requires_grad=True)
    found = report(model, x, {"exclude": ["blocks.1*"]})
    int8 = {(row.module, row.role) for row in found.int8_gemms}
    for module in ("blocks.0.fc", "blocks.2.fc", "head"):
        assert {(module, role) for role in ("forward", "dgrad", "wgrad")} <= int8
    assert not any(module == "blocks.1.fc" for module, _ in int8)
    excluded = [op for op in found.float_ops if op.module == "blocks.1.fc"]
    assert sorted(op.role for op in excluded) == ["dgrad", "forward", "wgrad"]
    assert all("exclude pattern 'blocks.1*'" in op.reason for op in excluded)


def test_nested_compile_regions_compute_what_the_unmarked_model_computes():
    torch.manual_seed(0)
    marked = Nested()
    unmarked = copy.deepcopy(marked)
    for block in unmarked.blocks:  # the same code without the region
        block.forward = functools.partial(lambda self, x: F.gelu(self.fc(x)), block)
    x = torch.randn(8, 16)
    results = []
    for model in (marked, unmarked):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="gradq_eager", options={"stats": True})
        out = compiled(x)
        out.square().mean().backward()
        results.append((out, [p.grad for p in model.parameters()], gradq_fx.layer_stats(model)))
    (out, grads, stats), (want_out, want_grads, want_stats) = results
    assert torch.equal(out, want_out)
    assert all(torch.equal(g, w) for g, w in zip(grads, want_grads, strict=True))
    layers = {"blocks.0.fc", "blocks.1.fc", "blocks.2.fc", "head"}
    assert stats.keys() == want_stats.keys() == layers


class Unreachable(torch.nn.Module):
    """Matmuls where gradq does not rewrite: a torch.cond branch, a custom autograd.Function,
    an einsum; and a Linear it does rewrite."""

    class Product(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x @ w

        @staticmethod
        def backward(ctx, grad):
            x, w = ctx.saved_tensors
            return grad @ w.t(), x.t() @ grad

    def __init__(self):
        super().__init__()
        self.branch = torch.nn.Linear(16, 16)
        self.table = torch.nn.Parameter(torch.randn(16, 16))
        self.mix = torch.nn.Parameter(torch.randn(16, 16))
        self.out = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = torch.cond(x.sum() > 0, lambda x: self.branch(x), lambda x: x * 2, (x,))
        h = h + Unreachable.Product.apply(x, self.table) + torch.einsum("ij,jk->ik", x, self.mix)
        return self.out(h)


def test_unreachable_matmuls_are_reported_and_warned_with_their_reason(caplog):
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    found = report(Unreachable(), x)
    assert {row.module for row in found.int8_gemms} == {"out"}
    by_reason = {}
    for op in found.float_ops:
        by_reason.setdefault(op.reason, set()).add((op.graph, op.role))
    cond = "inside torch.cond: gradq does not rewrite control-flow branches"
    function = "inside a custom torch.autograd.Function"
    assert by_reason[cond] == {("fwd", "forward"), ("bwd", "wgrad")}
    assert {("fwd", "forward"), ("bwd", "wgrad")} <= next(
        v for k, v in by_reason.items() if k.startswith(function)
    )
    assert by_reason["einsum: not rewritten by gradq"] == {("fwd", "forward"), ("bwd", "wgrad")}
    codes = {op.code for op in found.float_ops}
    assert codes == {Reason.UNREACHABLE.value, Reason.NO_INT8_PATH.value}

    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="gradq_fx"):
        compiled = torch.compile(Unreachable(), backend="gradq_eager")
        compiled(x).sum().backward()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert cond in warnings[0] and function in warnings[0] and "einsum" in warnings[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("3 GEMMs rewritten" in m and "unreachable" in m for m in infos)


def test_flex_attention_is_reported_as_float():
    from torch.nn.attention.flex_attention import flex_attention

    class Flex(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 16)

        def forward(self, x):
            q = self.qkv(x).view(1, 1, 8, 16)
            return flex_attention(q, q, q, score_mod=lambda s, b, h, i, j: s * 0.5)

    # Inference only: flex attention has no backward on the CPU.
    found = report(Flex(), torch.randn(8, 16), training=False)
    assert [row.module for row in found.int8_gemms] == ["qkv"]
    (flex,) = found.float_ops
    assert flex.op == "flex_attention" and flex.flops > 0
    assert "flex_attention" in flex.reason
    assert flex.code == Reason.NO_INT8_PATH.value
