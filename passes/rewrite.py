"""Replace every matmul-like node that `annotate` marked for quantization by gradq's ops.

Runs on Dynamo's graph, before AOTAutograd. Each replacement is an autograd function whose
forward and backward GEMMs are `torch.ops.gradq.mm` nodes labelled with their role, so the
joint graph AOTAutograd derives holds the forward, dgrad and wgrad GEMMs of every layer:

    before:  linear = torch._C._nn.linear(input=x, weight=w, bias=b)
    after:   linear = gradq_fx.ops.quantized_linear(x, w, b, GemmSite(module="blocks.0.mlp.fc1",
                          forward=("8:per_row:..", "8:per_row:.."), dgrad_a=(..), dgrad_b=(..)))

    before:  sdpa = torch._C._nn.scaled_dot_product_attention(query=q, key=k, value=v, ...)
    after:   sdpa = gradq_fx.ops.quantized_attention(q, k, v, ..., qk_site=.., pv_site=..)

Nodes keep their metadata (the value, its shape and dtype are unchanged).
"""

from __future__ import annotations

from torch import fx
from torch.fx.operator_schemas import normalize_function

from gradq_fx import ops
from gradq_fx.config import GradQConfig, Role
from gradq_fx.passes.annotate import Decision, Kind


def _arguments(node: fx.Node) -> dict:
    """The node's arguments by name. Tensor methods and `operator.matmul` have no schema to
    normalise against: their two operands are named (input, other) like torch.matmul's."""
    normalized = None
    if node.op == "call_function":
        normalized = normalize_function(
            node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
        )
    if normalized is None:
        return dict(zip(("input", "other"), node.args, strict=True))
    arguments = dict(normalized.kwargs)
    if "mat2" in arguments:  # torch.mm and torch.bmm
        arguments["other"] = arguments.pop("mat2")
    return arguments


def site_for(module: str, config: GradQConfig, right_is_weight: bool) -> ops.GemmSite:
    """The operand specs of a GEMM's three roles; ("", "") where the config keeps a role float."""
    act, grad = config.activation.encode(), config.gradient.encode()
    right = config.weight.encode() if right_is_weight else act
    role_b = Role.WGRAD if right_is_weight else Role.DGRAD

    def specs(role: Role, left: str, right: str) -> tuple[str, str]:
        return (left, right) if config.quantizes(role) else ("", "")

    return ops.GemmSite(
        module=module,
        forward=specs(Role.FORWARD, act, right),
        dgrad_a=specs(Role.DGRAD, grad, right),
        dgrad_b=specs(role_b, act, grad),
        role_b=role_b.value,
    )


def _replacement(node: fx.Node, decision: Decision, config: GradQConfig):
    """(function, args, kwargs) of the gradq call that replaces `node`."""
    arguments = _arguments(node)
    if decision.kind is Kind.LINEAR and "weight" in arguments:
        site = site_for(decision.module, config, right_is_weight=True)
        return (
            ops.quantized_linear,
            (arguments["input"], arguments["weight"]),
            {
                "bias": arguments.get("bias"),
                "site": site,
            },
        )
    if decision.kind is Kind.LINEAR:  # matmul(x, W) with W a parameter [K, N]
        site = site_for(decision.module, config, right_is_weight=True)
        return ops.quantized_matmul, (arguments["input"], arguments["other"]), {"site": site}
    if decision.kind is Kind.MATMUL:
        site = site_for(f"{decision.module}[{node.name}]", config, right_is_weight=False)
        return ops.quantized_matmul, (arguments["input"], arguments["other"]), {"site": site}
    if decision.kind is Kind.ATTENTION:
        sites = {
            f"{name}_site": site_for(f"{decision.module}[{name}]", config, right_is_weight=False)
            for name in ("qk", "pv")
        }
        args = (arguments.pop("query"), arguments.pop("key"), arguments.pop("value"))
        return ops.quantized_attention, args, {**arguments, **sites}
    raise ValueError(f"gradq cannot rewrite a {decision.kind.value} node ({node.name})")


def run(gm: fx.GraphModule, config: GradQConfig) -> int:
    """Rewrite the nodes `annotate` marked; return how many were rewritten."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        decision = node.meta.get("gradq")
        if decision is None or not decision.quantize:
            continue
        function, args, kwargs = _replacement(node, decision, config)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(function, args, kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rewritten += 1
    gm.graph.lint()
    gm.recompile()
    return rewritten
