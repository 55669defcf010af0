"""The `gradq` torch.compile backend: Dynamo graph -> gradq rewrite -> Inductor.

`torch.compile(model, backend="gradq", options={...})` finds `gradq_backend` through the
`torch_dynamo_backends` entry point (pyproject.toml); nothing registers it on import.

For scripts that can only name the backend (timm's `train.py --torchcompile gradq`):
- `GRADQ_OPTIONS`, a JSON object of gradq's options, applies under the options `torch.compile`
  passes (those win, key by key);
- every compiled graph logs one INFO line on the `gradq_fx` logger (what was rewritten, the
  INT8 share of GEMM FLOPs per role, the lowering, what stays float), and a WARNING line
  naming the matmul-like ops gradq cannot rewrite, if any;
- `GRADQ_REPORT=DIR` writes each compiled graph's full report into DIR (text and JSON).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from gradq_fx import lowerings, plan, regions, report
from gradq_fx.aot import aot_eager
from gradq_fx.config import GradQConfig
from gradq_fx.passes import lower, prepare

log = logging.getLogger("gradq_fx")

OPTIONS_VARIABLE = "GRADQ_OPTIONS"
REPORT_VARIABLE = "GRADQ_REPORT"

# The report of every graph `announce` saw compiled, oldest first (`compiled_reports`).
_REPORTS: list[report.Report] = []


def environment_options() -> dict[str, Any]:
    """The options of `GRADQ_OPTIONS` (empty when it is unset), checked: a ValueError names the
    variable, and the key where a value is bad."""
    text = os.environ.get(OPTIONS_VARIABLE, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        message = f"{OPTIONS_VARIABLE} must be a JSON object of gradq options: {error}"
        raise ValueError(message) from None
    if not isinstance(options, dict):
        raise ValueError(f"{OPTIONS_VARIABLE} must be a JSON object of gradq options, got {text!r}")
    try:
        GradQConfig.from_options(options)
    except ValueError as error:
        raise ValueError(f"{OPTIONS_VARIABLE}: {error}") from None
    return options


def to_config(options: GradQConfig | Mapping[str, Any] | None) -> GradQConfig:
    """The config a compile runs with: a GradQConfig as given, or the options dict over
    `GRADQ_OPTIONS` (the dict's keys win)."""
    if isinstance(options, GradQConfig):
        return options
    if options is not None and not isinstance(options, Mapping):
        GradQConfig.coerce(options)  # raises its ValueError
    return GradQConfig.coerce({**environment_options(), **(options or {})})


def example_device(example_inputs: Sequence[Any]) -> torch.device:
    """The device the compiled graph runs on: that of its first tensor input."""
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


class Observer:
    """What one compile of a rewritten graph (a Dynamo graph, or a piece of one split at its
    blocks) rewrote: the lowering pass shows it each graph it lowers (before lowering), and
    `report` is that of the graph AOTAutograd derived from the compiled one (not those
    Inductor compiles for the bodies of higher-order ops, which it may lower first)."""

    def __init__(self, gm: fx.GraphModule, example_inputs, decisions, config: GradQConfig):
        # After the rewrite: its statistics probes, registered on gm, are the first primals.
        self.is_parameter = report.primal_parameters(gm, example_inputs)
        self.decisions = decisions
        self.config = config
        # AOTAutograd derives a joint graph exactly when this holds (else an inference graph).
        tensors = [*gm.parameters(), *(t for t in example_inputs if isinstance(t, torch.Tensor))]
        self.training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        self.report: report.Report | None = None

    def __call__(self, graph: fx.GraphModule) -> None:
        if self.report is not None:
            return
        captured = report.Captured.of(graph, self.is_parameter, self.decisions)
        inputs = [n for n in graph.graph.find_nodes(op="placeholder") if "tangents" not in n.name]
        if (captured.num_forward_outputs is not None) != self.training or len(inputs) != len(
            self.is_parameter
        ):
            return  # a body Inductor compiles on its own
        self.report = report.analyse([captured], self.config, self.training)

    def result(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> report.Report:
        """The report, once `gm` compiled. Two compiles show the lowering pass no graph of
        gm's: AOTAutograd's cache serves a graph without gradq's ops (a piece holding only an
        excluded head, say), and a graph whose outputs all alias its inputs (a reshape between
        stages) gets no joint graph. Then a trace of gm, compiling nothing, makes the report."""
        if self.report is None:
            self.report = report.traced(
                gm, example_inputs, self.decisions, self.config, self.training
            )
        return self.report


def announce(found: report.Report) -> None:
    """Log a compiled graph's summary (INFO) and what stays float where gradq cannot rewrite it
    (WARNING); write its report under GRADQ_REPORT."""
    name = _graph_name()
    _REPORTS.append(found)
    mode = "training" if found.training else "inference"
    log.info("gradq: graph %s (%s): %s", name, mode, found.summary())
    warning = found.warning()
    if warning is not None:
        log.warning("gradq: graph %s: %s", name, warning)
    folder = os.environ.get(REPORT_VARIABLE)
    if folder:
        write_report(found, Path(folder), name)


def compiled_reports() -> list[report.Report]:
    """The reports of the graphs gradq's backends compiled in this process, oldest first:
    what they rewrote, as they compiled it, with no second trace of the model. Every compile
    adds one, a cache hit included (`Observer.result`)."""
    return list(_REPORTS)


def _graph_name() -> str:
    """Dynamo's id of the graph being compiled ("0/0": frame 0, first compile), with the
    process's rank under torch.distributed ("0/0 rank 1")."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    name = str(compile_id) if compile_id is not None else "?"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        name += f" rank {torch.distributed.get_rank()}"
    return name


def write_report(found: report.Report, folder: Path, name: str) -> list[Path]:
    """Write a graph's report as DIR/gradq-<name>.txt and .json; return the two paths."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = "gradq-" + re.sub(r"[^0-9A-Za-z]+", "-", name).strip("-")
    paths = [folder / f"{stem}.txt", folder / f"{stem}.json"]
    paths[0].write_text(found.to_text() + "\n", encoding="utf-8")
    paths[1].write_text(found.to_json() + "\n", encoding="utf-8")
    log.info("gradq: graph %s: report written to %s", name, paths[0])
    return paths


def inductor_patches(
    config: GradQConfig,
    device: torch.device,
    mode: str | None = None,
    observer: Observer | None = None,
) -> dict[str, Any]:
    """Inductor config for gradq: its joint-graph pass, plus what `mode` and the lowering ask."""
    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    lowering = lowerings.resolve(config.lowering, device)  # raises for one the device lacks
    patches["joint_custom_post_pass"] = lower.LowerPass(lowering.kind, config.fallback, observer)
    patches.update(lowering.inductor_config())
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
    device = example_device(example_inputs)
    lowerings.resolve(config.lowering, device)  # fail before rewriting anything
    decisions = prepare(gm, config)

    def compile_graph(graph: fx.GraphModule, inputs: Sequence[Any]) -> regions.Compiled:
        observer = Observer(graph, inputs, decisions, config)
        patches = inductor_patches(config, device, mode, observer)
        compiled = compile_fx(graph, inputs, config_patches=patches)
        return compiled, observer.result(graph, inputs)

    return _compile(gm, example_inputs, config, compile_graph)


def gradq_eager_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: GradQConfig | Mapping[str, Any] | None = None,
):
    """The same rewrite and lowering run by AOTAutograd without Inductor (`backend="gradq_eager"`).

    For checking numerics and debugging: compiles in seconds, runs op by op.
    """
    config = to_config(options)
    lowering = lowerings.resolve(config.lowering, example_device(example_inputs)).kind
    decisions = prepare(gm, config)

    def compile_graph(graph: fx.GraphModule, inputs: Sequence[Any]) -> regions.Compiled:
        observer = Observer(graph, inputs, decisions, config)

        def lowered(joint: fx.GraphModule) -> None:
            plan.run(joint.graph, lowering, config.fallback)
            observer(joint)
            lower.apply(joint.graph)
            joint.recompile()

        compiled = aot_eager(graph, inputs, lowered)
        return compiled, observer.result(graph, inputs)

    return _compile(gm, example_inputs, config, compile_graph)


def _compile(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    config: GradQConfig,
    compile_graph: regions.Compiler,
):
    """Compile the rewritten graph with `compile_graph`, each repeated block once
    (`compile_once`), and announce what was rewritten."""
    split = None
    if config.compile_once:
        split = regions.compile_blocks(gm, example_inputs, compile_graph)
    if split is None:
        compiled, found = compile_graph(gm, example_inputs)
    else:
        compiled, found = split.module, split.report
        log.info(
            "gradq: graph %s: split into %d pieces at its repeated blocks, %d compiled",
            _graph_name(),
            split.pieces,
            split.compiled,
        )
    announce(found)
    return compiled


def compile(
    model: torch.nn.Module,
    config: GradQConfig | Mapping[str, Any] | None = None,
    **compile_kwargs: Any,
):
    """`torch.compile(model, backend="gradq")` with a GradQConfig (or options dict)."""
    to_config(config)  # fail here, not at the first call, on bad options
    return torch.compile(model, backend="gradq", options=config, **compile_kwargs)
