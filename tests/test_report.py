"""The report: every Linear's three GEMMs in INT8 with the right role, read from the real graphs.

Counts are checked against the model's own modules (named_modules), not against numbers
copied from a run, and each gradq GEMM's declared role against the role the joint graph's
structure implies (networkx analysis, independent of the rewrite's labels).
"""

from __future__ import annotations

import collections
import json
import math

import pytest
import torch

from gradq_fx.cli import main
from gradq_fx.report import report
from tests.conftest import tiny_model


def linear_paths(model: torch.nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def convolutions(model: torch.nn.Module) -> dict[str, torch.nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


def gemm_conv_paths(model: torch.nn.Module) -> set[str]:
    """The Conv2d modules gradq quantizes: groups 1 and dilation 1 (GEMMs: 1x1 or kernel ==
    stride without padding; implicit GEMMs: the rest)."""
    return {
        name
        for name, m in convolutions(model).items()
        if m.groups == 1 and (m.kernel_size == (1, 1) or m.dilation == (1, 1))
    }


def gemm_layer_paths(model: torch.nn.Module) -> set[str]:
    return linear_paths(model) | gemm_conv_paths(model)


# A patch embedding (or MobileViT's stem) reads the image, which needs no gradient: it has no
# dgrad GEMM.
IMAGE_READERS = {"patch_embed.proj", "stem.conv"}


def expected_roles(module: str) -> collections.Counter:
    if module in IMAGE_READERS:
        return collections.Counter(forward=1, wgrad=1)
    return collections.Counter(forward=1, dgrad=1, wgrad=1)


def conv_flops(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Each Conv2d's multiply-add count x 2, from its output shape in an eager forward."""
    shapes = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, out.shape))
        for name, m in convolutions(model).items()
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return {
        name: 2 * math.prod(shapes[name]) * m.in_channels // m.groups * math.prod(m.kernel_size)
        for name, m in convolutions(model).items()
    }


def int8_roles_by_module(result) -> dict[str, collections.Counter]:
    roles = collections.defaultdict(collections.Counter)
    for row in result.int8_gemms:
        roles[row.module][row.role] += 1
    return roles


CASES = [
    ("deit_tiny_patch16_224", True),
    ("deit_tiny_patch16_224", False),
    ("swin_tiny_patch4_window7_224", True),
    ("mobilevit_xxs", True),
]


@pytest.mark.parametrize(("name", "fused_attn"), CASES)
def test_every_linear_and_gemm_conv_has_one_int8_gemm_per_role(name, fused_attn):
    model, size = tiny_model(name, fused_attn=fused_attn)
    result = report(model, torch.randn(2, 3, size, size))

    roles = int8_roles_by_module(result)
    assert set(roles) == gemm_layer_paths(model)
    assert all(counter == expected_roles(m) for m, counter in roles.items()), roles
    for row in result.gemms:
        assert row.role == row.graph_role, row
        assert row.graph == ("fwd" if row.role == "forward" else "bwd"), row


@pytest.mark.parametrize(("name", "fused_attn"), CASES)
def test_int8_attention_quantizes_qk_and_pv(name, fused_attn):
    model, size = tiny_model(name, fused_attn=fused_attn)
    result = report(model, torch.randn(2, 3, size, size), {"attention": "int8"})

    attention_rows = [row for row in result.int8_gemms if row.module.endswith("]")]
    linears = linear_paths(model)
    attention_modules = {p.rsplit(".", 1)[0] for p in linears if p.endswith(".qkv")}
    assert attention_modules, "the test model has no qkv projections"
    # Two GEMMs per attention (QK^T and PV), each with a forward and two input gradients.
    per_attention = collections.Counter(row.module.split("[")[0] for row in attention_rows)
    assert per_attention == {module: 6 for module in attention_modules}
    assert all(row.role == row.graph_role for row in result.gemms)
    # No attention matmul is left in float.
    assert not [op for op in result.float_ops if "attention" in op.op or op.op == "bmm"]


def test_float_ops_carry_reasons_and_coverage_adds_up():
    model, size = tiny_model("deit_tiny_patch16_224")
    result = report(model, torch.randn(2, 3, size, size), {"exclude": ["head"]})

    assert "head" not in int8_roles_by_module(result)
    head = [op for op in result.float_ops if op.module == "head"]
    assert sorted(op.role for op in head) == ["dgrad", "forward", "wgrad"]
    assert all("excluded by config" in op.reason for op in head)
    assert not [op for op in result.float_ops if op.op.startswith("convolution")]
    sdpa = [op for op in result.float_ops if "attention" in op.op]
    assert sdpa and all("attention kept float" in op.reason for op in sdpa)

    coverage = result.coverage()
    int8 = sum(row.flops for row in result.int8_gemms)
    every = int8 + sum(op.flops for op in result.float_ops)
    assert coverage["total"]["int8_flops"] == int8
    assert coverage["total"]["flops"] == every
    assert 0 < coverage["total"]["ratio"] < 1
    # The forward GEMM of a linear is 2*M*K*N: check one against the model's own sizes.
    fc1 = next(r for r in result.gemms if r.module == "blocks.0.mlp.fc1" and r.role == "forward")
    tokens = 2 * ((size // 16) ** 2 + 1)
    layer = model.blocks[0].mlp.fc1
    assert fc1.flops == 2 * tokens * layer.in_features * layer.out_features
    # The patch embedding as a GEMM: forward and wgrad (the image needs no gradient), each
    # with the convolution's FLOPs.
    x = torch.randn(2, 3, size, size)
    patch = {r.role: r.flops for r in result.int8_gemms if r.module == "patch_embed.proj"}
    flops = conv_flops(model, x)["patch_embed.proj"]
    assert patch == {"forward": flops, "wgrad": flops}

    # With convolutions=False the same FLOPs are counted, as float convolution ops.
    float_convs = report(model, x, {"exclude": ["head"], "convolutions": False})
    conv = [op for op in float_convs.float_ops if op.op.startswith("convolution")]
    assert sorted(op.role for op in conv) == ["forward", "wgrad"]
    assert all(op.module == "patch_embed.proj" and op.flops == flops for op in conv)
    assert all("convolutions=False" in op.reason for op in conv)
    assert {role: c["flops"] for role, c in float_convs.coverage().items()} == {
        role: c["flops"] for role, c in coverage.items()
    }


def test_mobilevit_dense_and_pointwise_convs_are_int8_and_depthwise_ones_float_with_reasons():
    model, size = tiny_model("mobilevit_xxs")
    x = torch.randn(2, 3, size, size)
    flops = conv_flops(model, x)
    result = report(model, x)

    convs = convolutions(model)
    pointwise = {name for name, m in convs.items() if m.kernel_size == (1, 1)}
    depthwise = {name for name, m in convs.items() if m.groups == m.in_channels > 1}
    dense = set(convs) - pointwise - depthwise
    assert pointwise and depthwise and dense
    assert all(convs[name].kernel_size == (3, 3) for name in dense)
    rows = collections.defaultdict(dict)
    for row in result.int8_gemms:
        rows[row.module][row.role] = row
    for name in pointwise | dense:  # every role INT8, with the convolution's FLOPs
        roles = ("forward", "wgrad") if name in IMAGE_READERS else ("forward", "dgrad", "wgrad")
        assert {role: row.flops for role, row in rows[name].items()} == dict.fromkeys(
            roles, flops[name]
        ), name
        assert {row.op for row in rows[name].values()} == {
            "gradq.conv2d" if name in dense else "gradq.mm"
        }, name
    for name in dense:  # the scale groupings an implicit GEMM takes for per_row, shown
        scales = {role: (row.a_scales, row.b_scales) for role, row in rows[name].items()}
        assert scales["forward"] == ("per image", "per output channel"), name
        assert scales["wgrad"] == ("per input channel", "per output channel"), name
        if "dgrad" in scales:
            assert scales["dgrad"] == ("per image", "per input channel"), name
    assert "scale X (forward) or dY (dgrad) per image where per_row was asked" in str(result)
    float_ops = collections.defaultdict(dict)
    for op in result.float_ops:
        float_ops[op.module][op.role] = op
    assert not set(float_ops) & (pointwise | dense)
    for name in depthwise:
        assert name not in rows
        ops = float_ops[name]
        assert sorted(ops) == ["dgrad", "forward", "wgrad"], name
        reason = f"depthwise convolution (groups={convs[name].groups}): kept float"
        assert all(reason in op.reason for op in ops.values()), name
        # torch's FLOP counter overcounts a grouped conv's weight gradient; the report not.
        assert all(op.flops == flops[name] for op in ops.values()), name


def test_disabled_roles_are_float_and_reported():
    model, size = tiny_model("deit_tiny_patch16_224")
    result = report(model, torch.randn(2, 3, size, size), {"wgrad": False})

    assert {row.role for row in result.int8_gemms} == {"forward", "dgrad"}
    disabled = [op for op in result.float_ops if op.op == "gradq.mm"]
    assert len(disabled) == len(gemm_layer_paths(model))
    assert all(op.role == "wgrad" and "wgrad=False" in op.reason for op in disabled)
    assert result.coverage()["wgrad"]["int8_flops"] == 0
    assert result.coverage()["wgrad"]["flops"] > 0


def test_inference_reports_forward_only():
    model, size = tiny_model("deit_tiny_patch16_224")
    model.eval()
    result = report(model, torch.randn(2, 3, size, size))

    assert not result.training
    assert {row.role for row in result.gemms} == {"forward"}
    assert {row.module for row in result.int8_gemms} == gemm_layer_paths(model)
    assert math.isnan(result.coverage()["wgrad"]["ratio"])


def test_cli_json(capsys):
    assert main(["report", "--model", "deit_tiny_patch16_224", "--img-size", "32",
                 "--option", "exclude=head", "--format", "json"]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["exclude"] == ["head"]
    modules = {row["module"] for row in data["gemms"]}
    assert "head" not in modules and "blocks.11.mlp.fc2" in modules
    assert data["coverage"]["total"]["int8_flops"] > 0


def test_cli_rejects_bad_input(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--model", "no_such_model"])
    assert "unknown timm model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--img-size", "32", "--option", "attention=fp4"])
    assert "attention" in capsys.readouterr().err


def test_iqs_gradients_are_reported_as_simulated():
    model = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.GELU(), torch.nn.Linear(17, 5))
    x = torch.randn(7, 13, requires_grad=True)
    result = report(model, x, {"gradient_quantizer": "iqs"})

    lowering = {(row.module, row.role): row.lowering for row in result.gemms}
    assert {lowering[(m, "forward")] for m in ("0", "2")} == {"reference"}
    assert {lowering[(m, r)] for m in ("0", "2") for r in ("dgrad", "wgrad")} == {"simulated"}
    simulated = [op for op in result.float_ops if "IQS" in op.reason]
    assert len(simulated) == 4
    assert result.coverage()["dgrad"]["int8_flops"] == 0
    assert result.coverage()["forward"]["ratio"] == 1.0


def test_each_gemm_names_its_lowering():
    model = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.GELU(), torch.nn.Linear(17, 5))
    x = torch.randn(7, 13, requires_grad=True)

    def lowerings(options):
        return {(row.module, row.role): row.lowering for row in report(model, x, options).gemms}

    # auto on the CPU is the reference lowering; triton can be asked for (its ops then run
    # their torch reference on the CPU) and every quantized GEMM says so.
    assert set(lowerings({}).values()) == {"reference"}
    triton = lowerings({"lowering": "triton", "wgrad": False})
    assert {triton[(m, r)] for m in ("0", "2") for r in ("forward", "dgrad")} == {"triton"}
    assert {triton[(m, "wgrad")] for m in ("0", "2")} == {"float matmul"}
    assert set(lowerings({"lowering": "fused"}).values()) == {"fused"}
    with pytest.raises(ValueError, match="inductor_template.*CUDA"):
        report(model, x, {"lowering": "inductor_template"})


class _Product(torch.nn.Module):
    """Two activations multiplied, as attention's QK^T: no weight among the operands."""

    def forward(self, x, y):
        return torch.matmul(x, y.transpose(-1, -2))


def test_fake_quant_labels_name_each_operand_with_its_width():
    # Below 8 bits a GEMM is fake-quantized, and its label names what each operand is: W
    # (weight), A (activation) or G (gradient). With 4-bit gradients the backward GEMMs take
    # the gradient at 4 bits and the other operand at 8; the forward stays INT8.
    model = torch.nn.Sequential(torch.nn.Linear(13, 17))
    x = torch.randn(7, 13, requires_grad=True)
    rows = report(model, x, {"gradient_bits": 4}).gemms
    lowering = {row.role: row.lowering for row in rows}
    assert lowering == {"forward": "reference", "dgrad": "fake-quant W8G4",
                        "wgrad": "fake-quant A8G4"}  # fmt: skip

    x, y = torch.randn(2, 7, 16, requires_grad=True), torch.randn(2, 5, 16, requires_grad=True)
    options = {"attention": "int8", "activation_bits": 6, "gradient_bits": 3}
    rows = report(_Product(), (x, y), options).gemms
    assert sorted(row.lowering for row in rows) == [
        "fake-quant A6A6", "fake-quant A8G3", "fake-quant A8G3",
    ]  # fmt: skip
