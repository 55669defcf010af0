"""The `gradq` torch.compile backend: Dynamo graph -> gradq rewrite -> Inductor.

`torch.compile(model, backend="gradq", options={...})` finds `gradq_backend` through the
`torch_dynamo_backends` entry point (pyproject.toml); nothing registers it on import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx

from gradq_fx.config import GradQConfig, Lowering
from gradq_fx.passes import annotate, lower, rewrite
from gradq_fx.passes.annotate import Decision


def to_config(options: GradQConfig | Mapping[str, Any] | None) -> GradQConfig:
    if isinstance(options, GradQConfig):
        return options
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict or a GradQConfig, got {type(options).__name__}")
    return GradQConfig.from_options(options)


def prepare(gm: fx.GraphModule, config: GradQConfig) -> list[Decision]:
    """Annotate and rewrite Dynamo's graph in place; return one decision per matmul-like op."""
    decisions = annotate.run(gm, config)
    rewrite.run(gm, config)
    return decisions


def example_device(example_inputs: Sequence[Any]) -> torch.device:
    """The device the compiled graph runs on: that of its first tensor input."""
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def inductor_patches(
    config: GradQConfig, device: torch.device, mode: str | None = None
) -> dict[str, Any]:
    """Inductor config for gradq: its joint-graph pass, plus what `mode` and the lowering ask."""
    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    lowering = lower.resolve(config.lowering, device)  # raises for a lowering the device lacks
    patches["joint_custom_post_pass"] = lower.LowerPass(lowering, config.fallback)
    if lowering is Lowering.INDUCTOR_TEMPLATE:
        # Only Inductor's Triton template fuses the dequantize into the int8 GEMM's epilogue
        # (torch-compile-notes.md); cuBLAS would leave it a separate pass over int32.
        patches.update(max_autotune_gemm=True, max_autotune_gemm_backends="TRITON")
    return patches


def gradq_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: GradQConfig | Mapping[str, Any] | None = None,
    mode: str | None = None,
):
    """A TorchDynamo backend: rewrite the graph with gradq's ops, then compile with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    config = to_config(options)
    patches = inductor_patches(config, example_device(example_inputs), mode)
    prepare(gm, config)
    return compile_fx(gm, example_inputs, config_patches=patches)


def gradq_eager_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: GradQConfig | Mapping[str, Any] | None = None,
):
    """The same rewrite and lowering run by AOTAutograd without Inductor (`backend="gradq_eager"`).

    For checking numerics and debugging: compiles in seconds, runs op by op.
    """
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
    from torch._functorch.partitioners import default_partition
    from torch._inductor.decomposition import select_decomp_table

    config = to_config(options)
    lowering = lower.resolve(config.lowering, example_device(example_inputs))
    prepare(gm, config)

    def lowered(graph: fx.GraphModule) -> fx.GraphModule:
        lower.run(graph.graph, lowering, config.fallback)
        graph.recompile()
        return graph

    def partition(joint, joint_inputs, **kwargs):
        return default_partition(lowered(joint), joint_inputs, **kwargs)

    return aot_module_simplified(
        gm,
        example_inputs,
        fw_compiler=lambda graph, _inputs: make_boxed_func(graph.forward),
        bw_compiler=lambda graph, _inputs: make_boxed_func(graph.forward),
        inference_compiler=lambda graph, _inputs: make_boxed_func(lowered(graph).forward),
        partition_fn=partition,
        decompositions=select_decomp_table(),
    )


def compile(
    model: torch.nn.Module,
    config: GradQConfig | Mapping[str, Any] | None = None,
    **compile_kwargs: Any,
):
    """`torch.compile(model, backend="gradq")` with a GradQConfig (or options dict)."""
    to_config(config)  # fail here, not at the first call, on bad options
    return torch.compile(model, backend="gradq", options=config, **compile_kwargs)
