"""`gradq_fx.bench.candidates`: the model's linear shapes, the GEMM problems of each, and the
checks a candidate passes before it is timed."""

from __future__ import annotations

import pytest
import torch

from gradq_fx.bench.candidates import (
    GEMM_SPEC,
    KERNEL_CANDIDATES,
    ROLES,
    LinearShape,
    check_result,
    gemm_problems,
    int_mm_candidate,
    linear_shapes,
)
from gradq_fx.quantizer import quantized_matmul
from gradq_fx.train.model import create_model
from tests.bench.conftest import CPU


def test_linear_shapes_come_from_the_model_at_the_batch():
    with torch.device("meta"):
        model = create_model("test_vit", 10, 16, patch_size=4, depth=2)
    shapes = linear_shapes(model, batch_size=3, size=16)
    tokens = 3 * (16 // 4) ** 2 + 3  # patches and a class token per image
    assert shapes == [
        LinearShape("blocks.*.attn.qkv, blocks.*.mlp.fc1", 4, tokens, 64, 192),
        LinearShape("blocks.*.attn.proj", 2, tokens, 64, 64),
        LinearShape("blocks.*.mlp.fc2", 2, tokens, 192, 64),
        LinearShape("head", 1, 3, 64, 10),
    ]


def test_gemm_problems_have_each_roles_shape_and_layout():
    shape = LinearShape("fc", 1, tokens=37, in_features=24, out_features=40)
    forward, dgrad, wgrad = gemm_problems(shape, max_tokens=None, device=CPU, seed=0)
    assert (forward.role, dgrad.role, wgrad.role) == ROLES
    assert (forward.mkn, dgrad.mkn, wgrad.mkn) == ((37, 24, 40), (37, 40, 24), (40, 37, 24))
    assert forward.b.stride() == (1, 24)  # W^T: a transposed view, as F.linear sees it
    assert wgrad.a.stride() == (1, 40)  # dY^T
    assert forward.q_b.stride() == (1, 24)  # column-major, as cuBLAS wants it
    capped = gemm_problems(shape, max_tokens=16, device=CPU, seed=0)
    assert [p.mkn for p in capped] == [(16, 24, 40), (16, 40, 24), (40, 16, 24)]


def test_int_mm_candidate_equals_the_reference_numerics():
    """Checked the way the benchmark does before it times, and against exact integers."""
    shape = LinearShape("fc", 1, tokens=197, in_features=40, out_features=24)
    for problem in gemm_problems(shape, max_tokens=None, device=CPU, seed=1):
        out = int_mm_candidate(problem)()
        assert torch.equal(out, quantized_matmul(problem.a, problem.b, GEMM_SPEC, GEMM_SPEC))
        exact = problem.q_a.long() @ problem.q_b.long()  # int64: exact
        dequantized = exact.float() * problem.scale_a * problem.scale_b
        assert torch.equal(out, dequantized.to(problem.a.dtype))
        check_result(KERNEL_CANDIDATES["int_mm"], problem, out)


def test_check_result_rejects_a_wrong_answer():
    shape = LinearShape("fc", 1, tokens=20, in_features=16, out_features=8)
    problem = gemm_problems(shape, max_tokens=None, device=CPU, seed=2)[0]
    out = int_mm_candidate(problem)()
    out[3, 5] += 1
    with pytest.raises(AssertionError, match="1 of 160 values differ"):
        check_result(KERNEL_CANDIDATES["int_mm"], problem, out)
    with pytest.raises(AssertionError, match="SQNR"):
        check_result(KERNEL_CANDIDATES["bf16"], problem, torch.zeros_like(out))
