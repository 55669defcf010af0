"""annotate: one Decision per matmul-like op of Dynamo's graph, with the reason for float."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradq_fx.config import GradQConfig
from gradq_fx.passes import annotate
from gradq_fx.passes.annotate import Kind, Reason


class Zoo(torch.nn.Module):
    """Every kind of matmul-like op annotate must recognise."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)
        self.table = torch.nn.Parameter(torch.randn(8, 8))
        self.conv = torch.nn.Conv2d(2, 2, 3)
        self.vector = torch.nn.Parameter(torch.randn(8))

    def forward(self, x, image):
        h = self.proj(x)  # linear
        scores = h @ h.transpose(-2, -1)  # activation x activation
        h = scores.softmax(-1) @ h
        h = h @ self.table  # matmul with a weight on the right
        h = self.table @ h.transpose(-2, -1)  # weight on the left
        h = torch.matmul(h.transpose(-2, -1), self.vector)  # matrix-vector
        out = torch.addmm(self.head.bias, x[0], self.head.weight.t())
        return self.head(h.unsqueeze(-1).expand(-1, -1, 8)), out, self.conv(image)


def decisions(config: GradQConfig) -> list[annotate.Decision]:
    captured = []

    def backend(gm, example_inputs):
        captured.extend(annotate.run(gm, config))
        return gm.forward

    torch.compile(Zoo(), backend=backend, fullgraph=True)(
        torch.randn(2, 5, 8), torch.randn(1, 2, 7, 7)
    )
    return captured


def test_every_matmul_like_op_gets_a_decision():
    found = decisions(GradQConfig.from_options({"attention": "int8"}))
    by_kind = {}
    for decision in found:
        by_kind.setdefault(decision.kind, []).append(decision)

    linears = by_kind[Kind.LINEAR]
    assert sorted(d.module for d in linears) == ["", "head", "proj"]  # "" = matmul by table
    assert all(d.quantize for d in linears)
    matmuls = by_kind[Kind.MATMUL]
    assert [d.quantize for d in matmuls] == [True, True, False, False]
    assert "left operand" in matmuls[2].reason and "1-D operand" in matmuls[3].reason
    (addmm,) = by_kind[Kind.OTHER]
    assert not addmm.quantize and addmm.code is Reason.NO_INT8_PATH and "addmm" in addmm.reason
    assert [d.module for d in by_kind[Kind.CONVOLUTION]] == ["conv"]
    conv = by_kind[Kind.CONVOLUTION][0]  # a dense 3x3 convolution
    assert conv.quantize and "3x3 conv (stride 1, padding 0) as an implicit GEMM" in conv.reason


def test_attention_float_and_globs_keep_ops_in_float_with_reasons():
    config = GradQConfig.from_options({"exclude": ["he*"], "include": ["*"]})
    found = decisions(config)
    head = next(d for d in found if d.module == "head" and d.kind is Kind.LINEAR)
    assert not head.quantize and "exclude pattern 'he*'" in head.reason
    attention = [d for d in found if d.kind is Kind.MATMUL and "1-D" not in d.reason]
    attention = [d for d in attention if "left operand" not in d.reason]
    assert len(attention) == 2
    assert all(not d.quantize and "attention kept float" in d.reason for d in attention)

    only_proj = decisions(GradQConfig.from_options({"include": ["proj"]}))
    quantized = {d.module for d in only_proj if d.quantize}
    assert quantized == {"proj"}
    assert any("not matched by include" in d.reason for d in only_proj)


def test_integer_matmul_is_not_rewritten():
    captured = []

    def backend(gm, example_inputs):
        captured.extend(annotate.run(gm, GradQConfig.from_options({"attention": "int8"})))
        return gm.forward

    a = torch.randint(0, 5, (4, 4))
    torch.compile(lambda a, b: a @ b, backend=backend)(a, a)
    assert len(captured) == 1 and not captured[0].quantize
    assert "torch.int64 operand" in captured[0].reason


def test_module_path_strips_dynamo_prefix():
    captured = []

    def backend(gm, example_inputs):
        captured.extend(annotate.run(gm, GradQConfig()))
        return gm.forward

    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    torch.compile(model, backend=backend)(torch.randn(2, 4))
    assert [d.module for d in captured] == ["0.0"]
    assert F.linear is torch._C._nn.linear  # the target annotate recognises


class ConvZoo(torch.nn.Module):
    """Convolutions that are GEMMs (pointwise, strided, patch, 'same' 1x1), implicit GEMMs
    (dense, padded) and ones that stay float."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.pointwise = conv(8, 16, 1)
        self.strided = conv(8, 16, 1, stride=2)
        self.patch = conv(8, 16, 4, stride=4, bias=False)
        self.same = conv(8, 8, 1, padding="same")
        self.depthwise = conv(8, 8, 3, padding=1, groups=8)
        self.grouped = conv(8, 8, 1, groups=2)
        self.dense = conv(8, 8, 3, padding=1)
        self.dilated = conv(8, 8, 3, dilation=2)
        self.padded_1x1 = conv(8, 8, 1, padding=1)
        self.padded_patch = conv(8, 8, 2, stride=2, padding=1)
        self.same_3x3 = conv(8, 8, 3, padding="same")
        self.same_even = conv(8, 8, 2, padding="same")
        self.conv1d = torch.nn.Conv1d(8, 8, 1)
        self.transposed = torch.nn.ConvTranspose2d(8, 8, 2, stride=2)

    def forward(self, image):
        outs = [getattr(self, name)(image) for name in CONV_EXPECTED if name[0] != "_"]
        outs.append(self.conv1d(image.flatten(2)))
        outs.append(F.conv2d(image, image[:8, :, :1, :1]))  # weight is an activation
        return outs


# module -> (quantized, the reason's distinctive part)
CONV_EXPECTED = {
    "pointwise": (True, "int8: 1x1"),
    "strided": (True, "int8: 1x1"),
    "patch": (True, "int8: patchify (kernel = stride)"),
    "same": (True, "int8: 1x1"),
    "depthwise": (False, "depthwise convolution (groups=8): kept float, little arithmetic"),
    "grouped": (False, "grouped convolution (groups=2)"),
    "dense": (True, "int8: 3x3 conv (stride 1, padding 1) as an implicit GEMM; per_row scales"),
    "dilated": (False, "dilated 3x3 convolution (stride 1, padding 0, dilation 2)"),
    "padded_1x1": (True, "int8: 1x1 conv (stride 1, padding 1) as an implicit GEMM"),
    "padded_patch": (True, "int8: 2x2 conv (stride 2, padding 1) as an implicit GEMM"),
    "same_3x3": (True, "int8: 3x3 conv (stride 1, padding 1) as an implicit GEMM"),
    "same_even": (False, "2x2 convolution (stride 1, padding 'same'): no INT8 path for its"),
    "transposed": (False, "transposed convolution (conv_transpose2d)"),
}


def conv_decisions(config: GradQConfig) -> dict[str, annotate.Decision]:
    captured = []

    def backend(gm, example_inputs):
        captured.extend(annotate.run(gm, config))
        return gm.forward

    torch.compile(ConvZoo(), backend=backend, fullgraph=True)(torch.randn(8, 8, 16, 16))
    assert all(d.kind is Kind.CONVOLUTION for d in captured)
    return {d.module: d for d in captured}


def test_convolutions_that_are_gemms_are_quantized_the_rest_say_why():
    found = conv_decisions(GradQConfig())
    for module, (quantized, reason) in CONV_EXPECTED.items():
        assert found[module].quantize is quantized, (module, found[module])
        assert reason in found[module].reason, (module, found[module].reason)
    assert found["conv1d"].code is Reason.NO_INT8_PATH and "2-D" in found["conv1d"].reason
    assert not found[""].quantize and "weight is not a parameter" in found[""].reason


def test_convolutions_false_and_globs_keep_gemm_convolutions_float():
    found = conv_decisions(GradQConfig.from_options({"convolutions": False}))
    assert not any(d.quantize for d in found.values())
    assert found["pointwise"].code is Reason.CONFIG
    assert "convolutions=False" in found["pointwise"].reason
    # Reasons that hold whatever the config come first.
    assert "depthwise" in found["depthwise"].reason

    found = conv_decisions(GradQConfig.from_options({"exclude": ["patch"]}))
    assert not found["patch"].quantize and "exclude pattern 'patch'" in found["patch"].reason
    assert found["pointwise"].quantize and found["strided"].quantize


def test_dense_convolution_reason_says_when_per_row_becomes_per_image():
    per_tensor = {f"{o}_granularity": "per_tensor" for o in ("weight", "activation", "gradient")}
    found = conv_decisions(GradQConfig.from_options(per_tensor))
    assert found["dense"].quantize and "per_row" not in found["dense"].reason
    found = conv_decisions(GradQConfig.from_options({"gradient_granularity": "per_row"}))
    assert "per_row scales X (forward) and dY (dgrad) per image" in found["dense"].reason


class Ema(torch.nn.Module):
    """A wrapper that holds its model as `.module`, as DDP and timm's ModelEma do."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.module = model

    def forward(self, *args):
        return self.module(*args)


def test_globs_name_the_wrapped_models_modules():
    # timm's train.py compiles its ModelEmaV3 as it is: Dynamo names the head "module.head",
    # and exclude=["head"] must still keep it float.
    captured = []

    def backend(gm, example_inputs):
        captured.extend(annotate.run(gm, GradQConfig.from_options({"exclude": ["head"]})))
        return gm.forward

    torch.compile(Ema(Zoo()), backend=backend)(torch.randn(2, 5, 8), torch.randn(1, 2, 7, 7))
    linears = {d.module: d for d in captured if d.kind is Kind.LINEAR}
    assert not linears["module.head"].quantize
    assert "exclude pattern 'head'" in linears["module.head"].reason
    assert linears["module.proj"].quantize
    assert annotate.unwrapped("module.blocks.0._checkpoint_wrapped_module.attn") == "blocks.0.attn"
    assert annotate.unwrapped("modules.x") == "modules.x"  # not a wrapper's attribute
