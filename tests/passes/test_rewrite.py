"""rewrite: marked nodes become gradq ops with the right operand specs; values keep metadata."""

from __future__ import annotations

import torch

from gradq_fx import targets
from gradq_fx.config import GradQConfig, Role
from gradq_fx.passes import annotate, rewrite
from gradq_fx.passes.rewrite import site_for
from gradq_fx.quantizer import sqnr_db


def test_site_specs_follow_roles_and_config():
    config = GradQConfig.from_options(
        {"weight_granularity": "per_tensor", "gradient_rounding": "stochastic", "dgrad": False}
    )
    act, weight, grad = (getattr(config, o).encode() for o in ("activation", "weight", "gradient"))
    linear = site_for("fc", config, right_is_weight=True)
    assert linear.forward == (act, weight)
    assert linear.grad_left == ("", "")  # dgrad off
    assert linear.grad_right == (act, grad) and linear.right_role is Role.WGRAD
    attention = site_for("attn[qk]", config, right_is_weight=False)
    assert attention.forward == (act, act) and attention.right_role is Role.DGRAD
    assert attention.grad_right == ("", "")  # an attention operand's gradient is a dgrad


def test_rewritten_graph_runs_and_keeps_metadata():
    model = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.ReLU(), torch.nn.Linear(17, 5))
    seen = {}

    def backend(gm, example_inputs):
        config = GradQConfig()
        annotate.run(gm, config)
        marked = [n.meta["example_value"] for n in gm.graph.nodes if "gradq" in n.meta]
        seen["count"] = rewrite.run(gm, config)
        seen["targets"] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        rewritten = [
            n.meta["example_value"] for n in gm.graph.nodes if n.target is targets.gradq_linear
        ]
        seen["values"] = (marked, rewritten)
        return gm.forward

    x = torch.randn(7, 13)
    out = torch.compile(model, backend=backend)(x)
    assert seen["count"] == 2
    assert seen["targets"].count(targets.gradq_linear) == 2
    assert torch._C._nn.linear not in seen["targets"]
    marked, rewritten = seen["values"]
    assert [v.shape for v in marked] == [v.shape for v in rewritten] == [(7, 17), (7, 5)]
    # The rewritten graph runs the gradq ops eagerly: quantized, close to float.
    assert sqnr_db(model(x), out) > 30
    assert not torch.equal(model(x), out)


def test_gemm_convolution_becomes_quantized_conv2d_with_site_and_probe():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    )
    seen = {}

    def backend(gm, example_inputs):
        config = GradQConfig(stats=True)
        annotate.run(gm, config)
        before = [n.meta["example_value"] for n in gm.graph.nodes if "gradq" in n.meta]
        assert rewrite.run(gm, config) == 1  # the depthwise conv stays
        seen["calls"] = [n for n in gm.graph.nodes if n.target is targets.gradq_conv2d]
        seen["before"] = before
        return gm.forward

    x = torch.randn(2, 3, 17, 18)
    out = torch.compile(model, backend=backend, fullgraph=True)(x)
    (call,) = seen["calls"]
    assert call.args[3:] == ((4, 4), (0, 0), (1, 1), 1)  # stride, padding, dilation, groups
    assert call.kwargs["site"].module == "0" and call.kwargs["site"].right == "W"
    assert call.kwargs["probe"].op == "get_attr"  # statistics, as for a Linear's weight
    assert call.meta["example_value"].shape == seen["before"][0].shape == (2, 8, 4, 4)
    assert sqnr_db(model(x), out) > 30
