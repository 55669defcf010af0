"""The operators gradq's rewrite puts into a model's graph.

`torch.ops.gradq.mm` is one GEMM of a known role (forward / dgrad / wgrad) and module, with
the quantization of each operand spelled out as a `QuantSpec.encode()` string ("" = float).
It is opaque to AOTAutograd, so the joint graph holds one such node per GEMM of the training
step, labelled; the joint-graph pass `gradq_fx.passes.lower` then replaces each by the
reference numerics (`gradq_fx.quantizer.quantized_matmul`) for Inductor to compile.

`quantized_linear` and `quantized_matmul` are what the Dynamo-level rewrite calls in place of
`F.linear` and `torch.matmul`: autograd functions whose forward and backward are `gradq.mm`s.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from gradq_fx import quantizer
from gradq_fx.config import QuantSpec, Role


@torch.library.custom_op("gradq::mm", mutates_args=())
def gradq_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    a_spec: str,
    b_spec: str,
    role: str,
    module: str,
) -> torch.Tensor:
    """a [..., M, K] @ b [..., K, N] (+ bias [N]); quantized when both specs are non-empty."""
    return mm_reference(a, b, bias, a_spec, b_spec)


@gradq_mm.register_fake
def _(a, b, bias, a_spec, b_spec, role, module):
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.new_empty((*batch, a.shape[-2], b.shape[-1]))


def mm_reference(a, b, bias, a_spec: str, b_spec: str) -> torch.Tensor:
    """What one `gradq.mm` computes, in plain torch (traceable); the result has a's dtype."""
    if a_spec and b_spec:
        return quantizer.quantized_matmul(
            a, b, QuantSpec.decode(a_spec), QuantSpec.decode(b_spec), bias
        )
    out = torch.matmul(a, b)
    return (out if bias is None else out + bias).to(a.dtype)


class GemmSite(NamedTuple):
    """The three GEMMs of one rewritten matmul: each role's operand specs ("" = float).

    Strings and tuples only: the Dynamo graph stores it as a node argument, and FX writes
    node arguments into generated Python source (where it arrives as a plain tuple).
    """

    module: str
    forward: tuple[str, str]
    dgrad_a: tuple[str, str]  # grad of the left operand  = grad_out @ b^T
    dgrad_b: tuple[str, str]  # grad of the right operand = a^T @ grad_out
    role_b: str  # "wgrad" when the right operand is a weight, else "dgrad"


def _mm(a, b, bias, specs: tuple[str, str], role: str, module: str) -> torch.Tensor:
    return torch.ops.gradq.mm(a, b, bias, specs[0], specs[1], role, module)


class _QuantizedMatmul(torch.autograd.Function):
    """out = a @ b (+ bias), with a [..., M, K], b [..., K, N] of equal batch dims."""

    @staticmethod
    def forward(ctx, a, b, bias, site: GemmSite, probe):
        ctx.save_for_backward(a, b)
        ctx.site = site = GemmSite(*site)
        ctx.has_bias = bias is not None
        ctx.has_probe = probe is not None
        return _mm(a, b, bias, site.forward, Role.FORWARD.value, site.module)

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        site = ctx.site
        grad_a = grad_b = grad_bias = grad_probe = None
        if ctx.needs_input_grad[0]:
            grad_a = _mm(grad_out, b.mT, None, site.dgrad_a, Role.DGRAD.value, site.module)
        if ctx.needs_input_grad[1]:
            grad_b = _mm(a.mT, grad_out, None, site.dgrad_b, site.role_b, site.module)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        if ctx.has_probe and ctx.needs_input_grad[4]:
            # The probe's "gradient" is the statistics of dY's quantization in wgrad: it
            # reaches probe.grad on the device, with no host synchronisation.
            spec = QuantSpec.decode(site.dgrad_b[1])
            grad_probe = quantizer.quantization_stats(grad_out, spec, dim=-2)
        return grad_a, grad_b, grad_bias, None, grad_probe


def _autocast(*tensors):
    """Apply autocast's cast to the GEMM inputs: custom ops are invisible to autocast."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


def quantized_linear(x, weight, bias, site: GemmSite, probe=None) -> torch.Tensor:
    """F.linear(x, weight, bias) as three gradq GEMMs.

    probe: an optional [3] tensor requiring grad; backward gives it the wgrad gradient's
    quantization statistics (`quantizer.quantization_stats`) as its gradient.
    """
    return _matmul(x, weight.t(), bias, site, probe)


def quantized_matmul(a, b, site: GemmSite, probe=None) -> torch.Tensor:
    """torch.matmul(a, b) as gradq GEMMs (probe: as in `quantized_linear`)."""
    return _matmul(a, b, None, site, probe)


def _matmul(a, b, bias, site: GemmSite, probe=None) -> torch.Tensor:
    a, b, bias = _autocast(a, b, bias)
    if b.dim() == 2:
        # A 2-D right operand (a weight) meets all rows of a at once: one GEMM per role, so
        # wgrad contracts over every token instead of summing per-batch products.
        out = _QuantizedMatmul.apply(a.reshape(-1, a.shape[-1]), b, bias, site, probe)
        return out.reshape(*a.shape[:-1], b.shape[-1])
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = a.expand(*batch, *a.shape[-2:])
    b = b.expand(*batch, *b.shape[-2:])
    return _QuantizedMatmul.apply(a, b, bias, site, probe)


def quantized_attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    qk_site: GemmSite,
    pv_site: GemmSite,
) -> torch.Tensor:
    """F.scaled_dot_product_attention in its math form, QK^T and PV as gradq GEMMs.

    The softmax (and mask, dropout) stay in float32, as in both papers.
    """
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = quantized_matmul(query * scale, key.transpose(-2, -1), qk_site).float()
    if is_causal:
        n_q, n_k = scores.shape[-2:]
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
    return quantized_matmul(probs.to(value.dtype), value, pv_site)
