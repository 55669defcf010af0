"""Replace every matmul-like node that `annotate` marked for quantization by gradq's ops.

Runs on Dynamo's graph, before AOTAutograd. Each replacement is an autograd function whose
forward and backward GEMMs are `torch.ops.gradq.mm` nodes labelled with their role, so the
joint graph AOTAutograd derives holds the forward, dgrad and wgrad GEMMs of every layer:

    before:  linear = torch._C._nn.linear(input=x, weight=w, bias=b)
    after:   gradq_probe_0 = self.gradq_probe_0            (a get_attr; see `_probe`)
             linear = gradq_fx.targets.gradq_linear(x, w, b, site=("blocks.0.mlp.fc1",
                          ("8:per_row:..", "8:per_row:.."), (..), (..), "wgrad"),
                          probe=gradq_probe_0)

    before:  sdpa = torch._C._nn.scaled_dot_product_attention(query=q, key=k, value=v, ...)
    after:   sdpa = gradq_fx.targets.gradq_attention(q, k, v, ..., qk_site=.., pv_site=..)

    before:  conv2d = torch.conv2d(x, w, b, (16, 16), (0, 0), (1, 1), 1)
    after:   gradq_probe_0 = self.gradq_probe_0
             conv2d = gradq_fx.targets.gradq_conv2d(x, w, b, (16, 16), (0, 0), (1, 1), 1,
                          site=("patch_embed.proj", ..., "wgrad"), probe=gradq_probe_0)

(stride, padding, dilation, groups as `annotate.conv2d_geometry` reads them, 'same' resolved;
only convolutions of groups 1 and dilation 1 are marked: GEMMs, and dense k x k ones that
`targets.gradq_conv2d` turns into implicit GEMMs.)

Nodes keep their metadata (the value, its shape and dtype are unchanged).
"""

from __future__ import annotations

import dataclasses

from torch import fx
from torch._dynamo.source import AttrSource

from gradq_fx import stats, targets
from gradq_fx.config import GradQConfig, Operand, QuantSpec, Role, lsq_operand
from gradq_fx.passes.annotate import (
    Decision,
    Kind,
    arguments,
    conv2d_geometry,
    parameter_of,
    top_placeholder,
)
from gradq_fx.passes.subgraphs import Scope, scopes, thread


def _at_8_bits(spec: QuantSpec) -> str:
    return dataclasses.replace(spec, bits=8).encode()


def site_for(
    module: str,
    config: GradQConfig,
    right_is_weight: bool,
    lsq_bits: tuple[int | None, int | None] = (None, None),
) -> targets.GemmSite:
    """The operand specs of a GEMM's three roles; ("", "") where the config keeps a role float.

    Forward: the config's weight and activation specs (fake quantization below 8 bits, in
    `quantizer.quantized_matmul`), or `lsq_operand(bits)` for an operand an LSQ quantizer
    already fake-quantized (`lsq_bits`), which the GEMM takes as is. Backward (dgrad, wgrad):
    the gradient's own spec, and the other operand re-quantized at 8 bits whatever its
    forward width, so both backward GEMMs stay INT8 (per the kept dimension, as ever). With
    LSQ that operand is the fake-quantized one the forward saw, as the straight-through
    estimator wants; a 2- to 4-bit min-max re-quantization per input channel would instead
    add a second, different coarse error to the gradient.
    """
    act, grad = config.activation.encode(), config.gradient.encode()
    right = config.weight.encode() if right_is_weight else act
    left_bits, right_bits = lsq_bits
    left = act if left_bits is None else lsq_operand(left_bits)
    right = right if right_bits is None else lsq_operand(right_bits)
    act8 = _at_8_bits(config.activation)
    right8 = _at_8_bits(config.weight) if right_is_weight else act8

    def specs(role: Role, left: str, right: str) -> tuple[str, str]:
        return (left, right) if config.quantizes(role) else ("", "")

    site = targets.GemmSite(
        module=module,
        forward=specs(Role.FORWARD, left, right),
        grad_left=specs(Role.DGRAD, grad, right8),
        grad_right=("", ""),
        right=(Operand.WEIGHT if right_is_weight else Operand.ACTIVATION).value,
    )
    return site._replace(grad_right=specs(site.right_role, act8, grad))


def _probe(scope: Scope, weight: fx.Node, site: targets.GemmSite, config: GradQConfig):
    """A node of `scope`'s graph for the weight's statistics probe, or None (`gradq_fx.stats`).

    The probe is a [3] parameter that backward fills with the wgrad gradient's quantization
    statistics. It hangs on the weight (one per weight, shared by every graph compiled for
    it), and is registered on the top graph module so AOTAutograd treats it as an input; a
    body of a higher-order op (activation checkpointing) gets it as one more operand.
    """
    parameter = parameter_of(weight, scope)
    if not config.stats or not site.grad_right[1] or parameter is None:
        return None
    probe = stats.new_probe(parameter)
    top = scope.top
    gm = top.module
    # Several GEMMs may read one weight (LSQ's q, k and v blocks of a fused qkv weight): they
    # share its probe, registered once, and their statistics add up in its gradient.
    registered = {id(p): n for n, p in gm.named_parameters()}
    name = registered.get(id(probe))
    if name is None:
        name = f"gradq_probe_{len(registered)}"
        gm.register_parameter(name, probe)
        # AOTAutograd asks Dynamo where each parameter of a Dynamo graph lives (for its
        # guards): on the weight, under the probe attribute.
        if hasattr(gm, "_param_name_to_source"):
            weight_source = top_placeholder(weight, scope).meta["grapharg"].source
            gm._param_name_to_source[name] = AttrSource(weight_source, stats.PROBE_ATTRIBUTE)
    node = next(iter(top.graph.find_nodes(op="get_attr", target=name)), None)
    if node is None:
        with top.graph.inserting_after(top.placeholders()[-1]):
            node = top.graph.get_attr(name)
    return thread(node, scope)


def _replacement(scope: Scope, node: fx.Node, decision: Decision, config: GradQConfig):
    """(function, args, kwargs) of the gradq call that replaces `node`."""
    named = arguments(node)
    if decision.kind is Kind.LINEAR:  # F.linear(x, W, b), or matmul(x, W) with W [K, N]
        site = site_for(decision.module, config, True, decision.lsq_bits)
        if "weight" in named:
            probe = _probe(scope, named["weight"], site, config)
            args = (named["input"], named["weight"], named.get("bias"))
            return targets.gradq_linear, args, {"site": site, "probe": probe}
        probe = _probe(scope, named["other"], site, config)
        args = (named["input"], named["other"])
        return targets.gradq_matmul, args, {"site": site, "probe": probe}
    if decision.kind is Kind.MATMUL:
        site = site_for(f"{decision.module}[{node.name}]", config, right_is_weight=False)
        return targets.gradq_matmul, (named["input"], named["other"]), {"site": site}
    if decision.kind is Kind.CONVOLUTION:  # a conv2d that is a GEMM (annotate checked it)
        site = site_for(decision.module, config, right_is_weight=True)
        probe = _probe(scope, named["weight"], site, config)
        g = conv2d_geometry(node)
        args = (named["input"], named["weight"], named["bias"])
        args += (g.stride, g.padding, g.dilation, g.groups)
        return targets.gradq_conv2d, args, {"site": site, "probe": probe}
    if decision.kind is Kind.ATTENTION:
        sites = {
            f"{name}_site": site_for(f"{decision.module}[{name}]", config, right_is_weight=False)
            for name in ("qk", "pv")
        }
        args = (named.pop("query"), named.pop("key"), named.pop("value"))
        return targets.gradq_attention, args, {**named, **sites}
    raise ValueError(f"gradq cannot rewrite a {decision.kind.value} node ({node.name})")


def run(gm: fx.GraphModule, config: GradQConfig) -> int:
    """Rewrite the nodes `annotate` marked, in the top graph and in the bodies of higher-order
    ops (`subgraphs.REWRITTEN`); return how many were rewritten."""
    rewritten = 0
    found = scopes(gm)
    for scope in found:
        for node in list(scope.graph.nodes):
            decision = node.meta.get("gradq")
            if decision is None or not decision.quantize:
                continue
            with scope.graph.inserting_before(node):
                function, args, kwargs = _replacement(scope, node, decision, config)
                new = scope.graph.call_function(function, args, kwargs)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            scope.graph.erase_node(node)
            rewritten += 1
    for scope in found:  # a body's probe adds an operand to its op in the parent's graph
        scope.graph.lint()
        scope.module.recompile()
    return rewritten
