"""The timm model of a run, and how each precision runs it (eager, Inductor, or gradq).

`create_model` builds any timm model from scratch (no pretrained weights: training is
offline) with the run's classes, input size, patch size and depth where the model takes them.
`compile_for` applies the precision: the INT8 precisions compile with gradq's backend through
`GradQBackend`, which counts the matmul-like ops gradq rewrote in the graphs it compiled, so a
run can show (and a test can check) that the INT8 rewrite happened, under DDP too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from torch import fx

_UNEXPECTED_KEYWORD = re.compile(r"unexpected keyword argument '(\w+)'")


def create_model(
    name: str,
    num_classes: int,
    img_size: int,
    patch_size: int | None = None,
    depth: int | None = None,
) -> torch.nn.Module:
    """A freshly initialised timm model.

    `img_size` and `patch_size` are passed where the model takes them and silently left out
    where it does not (a CNN has no img_size, MobileViT no patch_size); `depth` was asked for
    explicitly, so a model without it raises ValueError.
    """
    if not timm.is_model(name):
        raise ValueError(f"--model: unknown timm model {name!r} (see timm.list_models())")
    optional = {"img_size": img_size, "patch_size": patch_size}
    kwargs = {key: value for key, value in optional.items() if value is not None}
    if depth is not None:
        kwargs["depth"] = depth
    while True:
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        except TypeError as error:
            match = _UNEXPECTED_KEYWORD.search(str(error))
            if match is None or match.group(1) not in kwargs:
                raise
            if match.group(1) == "depth":
                raise ValueError(f"--depth: timm's {name} takes no depth argument") from error
            del kwargs[match.group(1)]


def _rewritten_ops(gm: fx.GraphModule) -> int:
    """Matmul-like ops of a Dynamo graph that gradq rewrote (its annotation says `quantize`)."""
    return sum(
        1
        for node in gm.graph.nodes
        if getattr(node.meta.get("gradq"), "quantize", False) and node.op == "call_function"
    )


class GradQBackend:
    """gradq's Dynamo backend (`gradq` or `gradq_eager`), counting what it rewrote."""

    def __init__(self, name: str):
        self.name = name
        self.backend = torch._dynamo.lookup_backend(name)
        self.graphs = 0
        self.rewritten = 0

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
        compiled = self.backend(gm, example_inputs, **kwargs)
        self.graphs += 1
        self.rewritten += _rewritten_ops(gm)
        return compiled


def default_backend(device: torch.device) -> str:
    """gradq_eager on CPU (no Inductor code generation: starts in seconds), gradq on CUDA."""
    return "gradq" if device.type == "cuda" else "gradq_eager"


def compile_for(
    model: torch.nn.Module,
    precision_options: Mapping[str, Any] | None,
    backend: str | None,
    inductor: bool,
) -> tuple[torch.nn.Module, GradQBackend | None]:
    """The module to train: gradq-compiled when `precision_options` is given (INT8
    precisions), else compiled with Inductor when `inductor`, else `model` itself."""
    if precision_options is not None:
        gradq = GradQBackend(backend)
        return torch.compile(model, backend=gradq, options=dict(precision_options)), gradq
    if inductor:
        return torch.compile(model), None
    return model, None


def describe(model: torch.nn.Module) -> str:
    parameters = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}, {parameters / 1e6:.2f} M parameters"
