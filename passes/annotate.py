"""Decide, for every matmul-like op of a Dynamo graph, whether gradq quantizes it, and why.

This pass only marks nodes (policy); `rewrite` acts on the marks (mechanism). It sets
`node.meta["gradq"]` to a `Decision` on every matmul-like node and leaves the graph as it was:

    before and after:  linear = torch._C._nn.linear(input=x, weight=w, bias=b)
    after, in meta:    Decision(kind=LINEAR, module="blocks.0.attn.qkv", quantize=True, ...)

    before and after:  conv2d = torch.conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 48)
    after, in meta:    Decision(kind=CONVOLUTION, module="stages.1.1.conv2_kxk.conv",
                           quantize=False, reason="depthwise convolution (groups=48): ...")

Convolutions (`targets.gradq_conv2d`): a 2-D convolution of groups 1 and dilation 1 is
quantized. When it *is* a GEMM up to a layout change (no padding, and a 1x1 kernel or a
patchify kernel whose stride equals its size: ViT and Swin patch embeddings) it becomes
`gradq.mm`s; any other kernel, stride and padding (MobileViT's 3x3 convolutions) an implicit
GEMM, `gradq.conv2d`s. Depthwise, grouped, dilated, transposed, 1-D and 3-D convolutions stay
float, with the reason.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import operator
import re

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.operator_schemas import normalize_function

from gradq_fx import ops, targets
from gradq_fx.config import Attention, GradQConfig, Granularity
from gradq_fx.passes.subgraphs import Scope, scopes


class Kind(enum.Enum):
    LINEAR = "linear"  # F.linear, or a matmul with a weight operand
    MATMUL = "matmul"  # activation x activation (attention's explicit QK^T and PV)
    ATTENTION = "attention"  # fused F.scaled_dot_product_attention
    CONVOLUTION = "convolution"
    OTHER = "other"  # addmm, einsum, flex_attention, ...: matmul-like, not rewritten


class Reason(enum.Enum):
    """What kind of answer a Decision is: what the report and the compile-time log group by."""

    QUANTIZED = "quantized"  # rewritten into gradq's GEMMs
    CONFIG = "config"  # the options keep it float (globs, attention, convolutions)
    NO_INT8_PATH = "no_int8_path"  # gradq has no INT8 form of this op or of these operands
    UNREACHABLE = "unreachable"  # inside a higher-order op's body that gradq does not rewrite
    FALLBACK = "fallback"  # a gradq GEMM the fallback rule runs in float (measured slower)

    @property
    def warned(self) -> bool:
        """Whether a float op of this kind is warned about at compile time: one the user did
        not ask for (an op the options keep float is only listed in the INFO line)."""
        return self in (Reason.NO_INT8_PATH, Reason.UNREACHABLE)


@dataclasses.dataclass(frozen=True)
class Decision:
    node: str
    kind: Kind
    module: str
    quantize: bool
    reason: str
    code: Reason
    # The Dynamo-level higher-order op nodes whose bodies hold the node, outermost first
    # ("tag_activation_checkpoint/cond"); "" in the top graph.
    region: str
    # The bit widths of the (left, right) operands that LSQ quantizers already fake-quantized
    # (`gradq_fx.qat`), None for an operand the GEMM quantizes itself.
    lsq_bits: tuple[int | None, int | None] = (None, None)


_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm, torch.mm}
_MATMUL_METHODS = {"matmul", "bmm", "mm", "__matmul__"}
_ATTENTION = {F.scaled_dot_product_attention}
# F.conv2d is torch.conv2d, and so on: one set covers both spellings.
_TRANSPOSED = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_CONVOLUTION = {F.conv1d, F.conv2d, F.conv3d, *_TRANSPOSED}
_OTHER_FUNCTIONS = {
    torch.addmm,
    torch.baddbmm,
    torch.addbmm,
    torch.einsum,
    torch.bilinear,
    torch.ops.higher_order.flex_attention,
}
_VIEW_METHODS = {"t", "transpose", "permute", "view", "reshape", "contiguous", "expand", "mT"}
_VIEW_FUNCTIONS = {torch.t, torch.transpose, torch.permute, torch.reshape}
_LSQ = torch.ops.gradq.lsq_fake_quantize
_BLOCKS = {"chunk", "split", torch.chunk, torch.split}  # targets whose getitems are row blocks


def kind_of(node: fx.Node) -> Kind | None:
    """The matmul-like kind of a Dynamo graph node, or None for anything else."""
    if node.op == "call_function":
        target = node.target
        if target in _LINEAR:
            return Kind.LINEAR
        if target in _MATMUL_FUNCTIONS:
            return Kind.MATMUL
        if target in _ATTENTION:
            return Kind.ATTENTION
        if target in _CONVOLUTION:
            return Kind.CONVOLUTION
        if target in _OTHER_FUNCTIONS:
            return Kind.OTHER
    if node.op == "call_method" and node.target in _MATMUL_METHODS:
        return Kind.MATMUL
    return None


def _type_of(value) -> type:
    """The type `normalize_function` matches against a schema (to pick among overloads)."""
    if isinstance(value, fx.Node):
        return torch.Tensor
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return tuple[int, ...]
    return type(value)


def arguments(node: fx.Node) -> dict:
    """The node's arguments by name. Tensor methods and `operator.matmul` have no schema to
    normalise against: their two operands are named (input, other) like torch.matmul's.

    Argument types pick the overload where several fit (conv2d's padding: ints or a string).
    """
    normalized = None
    if node.op == "call_function":
        normalized = normalize_function(
            node.target,
            node.args,
            node.kwargs,
            arg_types=tuple(_type_of(a) for a in node.args),
            kwarg_types={k: _type_of(v) for k, v in node.kwargs.items()},
            normalize_to_only_use_kwargs=True,
        )
    if normalized is None:
        return dict(zip(("input", "other"), node.args, strict=True))
    named = dict(normalized.kwargs)
    if "mat2" in named:  # torch.mm and torch.bmm
        named["other"] = named.pop("mat2")
    return named


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """What decides whether a 2-D convolution is a GEMM (padding 'valid' resolved to 0)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str  # 'same' only where it pads
    dilation: tuple[int, int]
    groups: int
    in_channels: int

    @property
    def is_1x1(self) -> bool:
        return self.kernel == (1, 1)

    @property
    def is_gemm(self) -> bool:
        """A GEMM up to a layout change (`targets.conv2d_is_gemm`); 'same' padding is not."""
        if isinstance(self.padding, str):
            return False
        return targets.conv2d_is_gemm(
            self.kernel, self.stride, self.padding, self.dilation, self.groups
        )

    @property
    def is_implicit_gemm(self) -> bool:
        """Taken by gradq's implicit-GEMM path (`targets.conv2d_is_implicit_gemm`): groups 1 and
        dilation 1, numeric padding."""
        if isinstance(self.padding, str):
            return False
        return targets.conv2d_is_implicit_gemm(self.kernel, self.dilation, self.groups)


def _pair(value) -> tuple[int, int] | None:
    """conv2d's int-or-pair argument as a pair, or None where it is not (constant) ints."""
    if isinstance(value, int):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
        return None
    return {1: (*value, *value), 2: tuple(value)}.get(len(value))


def conv2d_geometry(node: fx.Node) -> ConvGeometry | None:
    """The geometry of a torch.conv2d node, or None where its arguments are not constants."""
    named = arguments(node)
    weight = named["weight"].meta.get("example_value")
    stride, dilation = _pair(named["stride"]), _pair(named["dilation"])
    padding, groups = named["padding"], named["groups"]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or not isinstance(groups, int):
        return None
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    if padding == "valid" or (padding == "same" and kernel == (1, 1)):
        padding = (0, 0)
    elif padding != "same":
        padding = _pair(padding)
    if None in (stride, padding, dilation):
        return None
    if padding == "same" and dilation == (1, 1) and all(k % 2 == 1 for k in kernel):
        # Odd kernels pad 'same' symmetrically, by half the kernel (conv2d takes 'same' at
        # stride 1 only); even ones pad one more on one side, which stays 'same'.
        padding = (kernel[0] // 2, kernel[1] // 2)
    return ConvGeometry(kernel, stride, padding, dilation, groups, groups * int(weight.shape[1]))


def _convolution_problem(node: fx.Node) -> str | None:
    """Why gradq keeps a convolution in float whatever the config, or None if it is a GEMM."""
    name = getattr(node.target, "__name__", str(node.target))
    if node.target in _TRANSPOSED:
        return f"transposed convolution ({name}): not rewritten by gradq"
    if node.target is not F.conv2d:
        return f"{name}: gradq rewrites 2-D convolutions only"
    geometry = conv2d_geometry(node)
    if geometry is None:
        return "conv2d with non-constant stride, padding, dilation or groups: kept float"
    g = geometry
    if g.groups != 1:
        if g.groups == g.in_channels:
            return (
                f"depthwise convolution (groups={g.groups}): kept float, little arithmetic "
                "for INT8 to gain"
            )
        return f"grouped convolution (groups={g.groups}): no INT8 path yet (one GEMM per group)"
    if g.is_gemm or g.is_implicit_gemm:
        return None
    kernel = "x".join(map(str, g.kernel))
    details = f"stride {_text(g.stride)}, padding {_text(g.padding)}"
    if g.dilation != (1, 1):
        details += f", dilation {_text(g.dilation)}"
        return f"dilated {kernel} convolution ({details}): no INT8 path yet"
    return f"{kernel} convolution ({details}): no INT8 path for its asymmetric 'same' padding"


def _text(pair: tuple[int, int] | str) -> str:
    """A conv2d argument as a reason shows it: 2 for (2, 2), (2, 3), 'same'."""
    if isinstance(pair, str):
        return repr(pair)
    return str(pair[0]) if pair[0] == pair[1] else str(pair)


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module the node came from ('' at top level).

    Reads Dynamo's `nn_module_stack`, or for AOTAutograd's backward nodes the stack of the
    forward op they differentiate.
    """
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    if not stack:
        return ""
    return dotted(list(stack.values())[-1][0])


def dotted(path: str) -> str:
    """A module path as Dynamo spells it ("L['self'].blocks.0") as the model names it."""
    return re.sub(r"^L\['[^']*'\]\.?", "", path)


def moved_path(path: str, old: str, new: str) -> str:
    """`path` moved from under module `old` to under `new` ('blocks.0.mlp' -> 'blocks.3.mlp');
    a path not under `old` as it is."""
    if path == old or path.startswith(old + "."):
        return new + path[len(old) :]
    return path


def _is_view(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _VIEW_METHODS) or (
        node.op == "call_function" and node.target in _VIEW_FUNCTIONS
    )


def _source(node: fx.Node, scope: Scope | None = None) -> tuple[fx.Node, Scope | None]:
    """The node whose value `node` reads, and its scope: behind view-like ops, LSQ fake
    quantization (its input), row blocks of chunk or split (a q, k or v block of a fused qkv
    weight) and, with a `scope`, the placeholders of higher-order op bodies (their operand in
    the enclosing graph)."""
    while True:
        if _is_view(node) or (node.op == "call_function" and node.target in (_LSQ, _LSQ.default)):
            node = node.args[0]
        elif (
            node.target is operator.getitem
            and isinstance(node.args[0], fx.Node)
            and node.args[0].target in _BLOCKS
        ):
            node = node.args[0].args[0]
        elif scope is not None and node.op == "placeholder" and scope.outer(node) is not None:
            node, scope = scope.outer(node)
        else:
            return node, scope


def top_placeholder(node: fx.Node, scope: Scope | None = None) -> fx.Node | None:
    """The placeholder of the top graph a node reads (`_source`), or None if it reads none."""
    node, scope = _source(node, scope)
    if node.op != "placeholder" or (scope is not None and scope.parent is not None):
        return None
    return node


def parameter_of(node: fx.Node, scope: Scope | None = None) -> torch.nn.Parameter | None:
    """The parameter a node reads (`_source`), if Dynamo recorded it."""
    node = top_placeholder(node, scope)
    if node is None:
        return None
    grapharg = node.meta.get("grapharg")
    example = grapharg.example if grapharg is not None else node.meta.get("example_value")
    return example if isinstance(example, torch.nn.Parameter) else None


def is_parameter(node: fx.Node, scope: Scope | None = None) -> bool:
    """True if the node reads a parameter placeholder or attribute (`_source`)."""
    return _source(node, scope)[0].op == "get_attr" or parameter_of(node, scope) is not None


def lsq_bits_of(node: fx.Node) -> int | None:
    """The bit width of the LSQ quantizer whose output `node` is (behind view-like ops, or a
    concatenation of such outputs at one width: a fused qkv weight), else None."""
    while _is_view(node):
        node = node.args[0]
    if node.op != "call_function":
        return None
    if node.target in (_LSQ, _LSQ.default):
        named = arguments(node)
        return ops.range_bits(named["low"], named["high"])
    if node.target is torch.cat:
        parts = node.kwargs.get("tensors", node.args[0] if node.args else ())
        widths = {lsq_bits_of(p) if isinstance(p, fx.Node) else None for p in parts}
        return widths.pop() if len(widths) == 1 else None
    return None


def _lsq_text(bits: tuple[int | None, int | None], right_is_weight: bool) -> str:
    """'W4A4' style: the LSQ widths of a GEMM's operands ('-' for one the GEMM quantizes)."""
    left, right = ("-" if b is None else str(b) for b in bits)
    return f"W{right}A{left}" if right_is_weight else f"A{left}A{right}"


# Attribute names under which torch and timm wrappers hold the module they wrap: DDP,
# DataParallel and timm's ModelEma ("module"), torch.compile ("_orig_mod"), FSDP1 and
# checkpoint_wrapper. A glob names the wrapped model's modules ("head"), whatever wraps it.
_WRAPPER_ROOTS = ("module.", "_orig_mod.")
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module)(?=\.|$)")


def unwrapped(module: str) -> str:
    """A module path without the wrappers' attribute names: 'module.blocks.0.
    _checkpoint_wrapped_module.attn' -> 'blocks.0.attn'."""
    module = _WRAPPER_SEGMENTS.sub("", module).lstrip(".")
    while module.startswith(_WRAPPER_ROOTS):
        module = module.split(".", 1)[1]
    return module


def _matches(module: str, pattern: str) -> bool:
    """Whether a glob names the module, as Dynamo's path spells it or without wrappers."""
    return any(fnmatch.fnmatchcase(path, pattern) for path in (module, unwrapped(module)))


def filter_reason(module: str, config: GradQConfig) -> str | None:
    """Why the include/exclude globs keep this module in float, or None if they do not."""
    if not any(_matches(module, pattern) for pattern in config.include):
        return f"not matched by include={list(config.include)}"
    for pattern in config.exclude:
        if _matches(module, pattern):
            return f"excluded by config (exclude pattern {pattern!r})"
    return None


def _operand_problem(node: fx.Node, kind: Kind) -> str | None:
    """Why the operands of a linear, matmul or convolution do not fit gradq's GEMMs, or None."""
    if kind not in (Kind.LINEAR, Kind.MATMUL, Kind.CONVOLUTION):
        return None
    values = [a.meta.get("example_value") for a in node.args[:2] if isinstance(a, fx.Node)]
    for value in values:
        if not isinstance(value, torch.Tensor):
            continue
        if not value.is_floating_point():
            return f"{value.dtype} operand: gradq quantizes floating-point GEMMs only"
        if kind is Kind.MATMUL and value.dim() < 2:
            return "matmul with a 1-D operand (a matrix-vector product): not rewritten"
    return None


def _decide(node: fx.Node, kind: Kind, config: GradQConfig, scope: Scope) -> Decision:
    module = module_path(node)

    region = scope.region

    def keep_float(reason: str, code: Reason) -> Decision:
        return Decision(node.name, kind, module, False, reason, code, region)

    if scope.reason is not None:
        return keep_float(scope.reason, Reason.UNREACHABLE)
    problem = _operand_problem(node, kind)
    if problem is not None:
        return keep_float(problem, Reason.NO_INT8_PATH)
    if kind is Kind.MATMUL:
        if is_parameter(node.args[0], scope):
            return keep_float(
                "matmul with a weight as left operand: not rewritten by gradq", Reason.NO_INT8_PATH
            )
        if is_parameter(node.args[1], scope):
            kind = Kind.LINEAR
    if kind is Kind.CONVOLUTION:
        return _decide_convolution(node, module, config, scope)
    if kind is Kind.OTHER:
        name = getattr(node.target, "__name__", node.target)
        return keep_float(f"{name}: not rewritten by gradq", Reason.NO_INT8_PATH)
    if kind in (Kind.MATMUL, Kind.ATTENTION) and config.attention is Attention.FLOAT:
        return keep_float("attention kept float (attention='float')", Reason.CONFIG)
    reason = filter_reason(module, config)
    if reason is not None:
        return keep_float(reason, Reason.CONFIG)
    if kind in (Kind.LINEAR, Kind.MATMUL):
        named = arguments(node)
        right = named.get("weight", named.get("other"))
        bits = (lsq_bits_of(named["input"]), lsq_bits_of(right))
        if bits != (None, None):
            text = _lsq_text(bits, kind is Kind.LINEAR)
            reason = f"LSQ fake-quant {text}: operands quantized upstream, float forward GEMM"
            return Decision(node.name, kind, module, True, reason, Reason.QUANTIZED, region, bits)
    return Decision(node.name, kind, module, True, "int8", Reason.QUANTIZED, region)


def _decide_convolution(node: fx.Node, module: str, config: GradQConfig, scope: Scope) -> Decision:
    reason, code = _convolution_problem(node), Reason.NO_INT8_PATH
    if reason is None and not is_parameter(arguments(node)["weight"], scope):
        reason = "convolution whose weight is not a parameter: not rewritten by gradq"
    if reason is None and not config.convolutions:
        reason, code = "convolutions kept float (convolutions=False)", Reason.CONFIG
    if reason is None:
        reason, code = filter_reason(module, config), Reason.CONFIG
    if reason is not None:
        return Decision(node.name, Kind.CONVOLUTION, module, False, reason, code, scope.region)
    g = conv2d_geometry(node)
    if g.is_gemm:
        shape = "1x1" if g.is_1x1 else "patchify (kernel = stride)"
        reason = f"int8: {shape} conv as a GEMM"
        return Decision(
            node.name, Kind.CONVOLUTION, module, True, reason, Reason.QUANTIZED, scope.region
        )
    kernel = "x".join(map(str, g.kernel))
    reason = f"int8: {kernel} conv (stride {_text(g.stride)}, padding {_text(g.padding)}) as an "
    reason += "implicit GEMM"
    if Granularity.PER_ROW in (config.activation.granularity, config.gradient.granularity):
        # Said here and in the report's rows: no silent change of granularity.
        reason += (
            "; per_row scales X (forward) and dY (dgrad) per image, not per pixel: a pixel's "
            "scale would vary along the window"
        )
    return Decision(
        node.name, Kind.CONVOLUTION, module, True, reason, Reason.QUANTIZED, scope.region
    )


def run(gm: fx.GraphModule, config: GradQConfig) -> list[Decision]:
    """Mark every matmul-like node with its Decision, in the top graph and in every body of a
    higher-order op (`subgraphs`; a body gradq does not rewrite marks its matmuls float with
    the op's reason); return them, top graph first."""
    decisions = []
    for scope in scopes(gm):
        for node in scope.graph.nodes:
            kind = kind_of(node)
            if kind is None:
                continue
            node.meta["gradq"] = decision = _decide(node, kind, config, scope)
            decisions.append(decision)
        scope.graph.lint()
    return decisions
