"""The step benchmark: a whole training step (forward, cross-entropy, backward, AdamW step,
zero_grad) of one model under each setting of `SETTINGS`: after a tiny compile that pays the
process's one-off compiler start-up, each setting compiled and warmed up in turn, then all
timed step by step in rounds, one step of each per round; the speed-ups against the float
baselines, `StepReport` (bench.json) and its text table.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from tabulate import tabulate

from gradq_fx import fallback, kernels
from gradq_fx.bench.config import SETTINGS, BenchConfig, Setting
from gradq_fx.bench.results import (
    Report,
    decoded,
    environment,
    format_ratio,
    input_size,
    log_failure,
    model_info,
    say,
    summary_or_none,
    timing_info,
)
from gradq_fx.bench.timing import Clock, Summary, release
from gradq_fx.train.model import GradQBackend, create_model

# Every setting's speed-up is reported against each of these that ran.
BASELINES = ("fp32-eager", "bf16-eager", "bf16-compile")
# Where a compiled setting's first step goes: torch's compile metrics (seconds, summed over
# every graph compiled, forward and backward) and gradq's own stages (`passes.timed`). The
# rows nest: Dynamo's total holds the forward compile, whose Inductor part and AOTAutograd
# part are rows too; the backward graph compiles at the first backward, outside Dynamo.
PHASES = {
    "dynamo: trace, rewrite, forward compile": "_compile.compile_inner",
    "gradq: annotate, rewrite": "gradq.prepare",
    "gradq: plan, lower": "gradq.lower",
    "inductor: forward and backward graphs": "compile_fx_inner",
    "inductor: backward graphs": "compile_fx.<locals>.bw_compiler",
    "inductor: lowering to its IR": "GraphLowering.run",
    "inductor: code generation": "GraphLowering.codegen",
    "inductor: loading generated code (C++ compile)": "PyCodeCache.load_by_key_path",
}


def speedups(medians: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """For each setting, baseline median / its median, for every baseline in `medians`."""
    return {
        name: {base: medians[base] / ms for base in BASELINES if base in medians}
        for name, ms in medians.items()
    }


@dataclasses.dataclass(frozen=True)
class SettingResult:
    """One setting's measurements (None where not measured; `error` when it failed)."""

    setting: str
    samples_ms: tuple[float, ...] = ()
    ms: Summary | None = None
    images_per_s: float | None = None
    speedup: dict[str, float] = dataclasses.field(default_factory=dict)
    peak_memory_bytes: int | None = None
    saved_bytes: int | None = None  # what the forward keeps for backward (`saved_bytes`)
    first_step_ms: float | None = None
    compile_s: float | None = None  # compiled settings: first step less the median step
    final_loss: float | None = None
    rewritten_ops: int | None = None  # gradq: matmul-like ops it rewrote into INT8 GEMMs
    # gradq on CUDA: each GEMM signature the fallback rule timed while compiling
    # (`gradq_fx.fallback.Measurement` as a dict); below 1, that GEMM runs in float.
    gemm_speedups: tuple[dict[str, Any], ...] = ()
    # Compiled settings: seconds each of torch's compile metrics grew by in the first step
    # (`compile_metrics`; `PHASES` names the ones the table shows).
    compile_phases: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SettingResult:
        return cls(
            **decoded(data, {"samples_ms": tuple, "ms": summary_or_none, "gemm_speedups": tuple})
        )

    @property
    def fallbacks(self) -> str | None:
        """How many of the GEMM signatures timed fall back to float, as "k/n" (None: none)."""
        if not self.gemm_speedups:
            return None
        slower = sum(1 for m in self.gemm_speedups if m["speedup"] < 1)
        return f"{slower}/{len(self.gemm_speedups)}"


@dataclasses.dataclass(frozen=True)
class StepReport(Report):
    """bench.json: Report's fields, gradq's options, and one result per setting."""

    MODE: ClassVar[str] = "step"
    DECODERS: ClassVar[dict[str, Callable]] = {
        "results": lambda results: {k: SettingResult.from_dict(v) for k, v in results.items()}
    }

    gradq_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    results: dict[str, SettingResult] = dataclasses.field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(result.error is not None for result in self.results.values())


def _build_model(config: BenchConfig) -> tuple[torch.nn.Module, int]:
    """The freshly initialised model of the run (seeded) and its input size."""
    torch.manual_seed(config.seed)
    model = create_model(
        config.model, config.num_classes, config.img_size, config.patch_size, config.depth
    )
    return model, input_size(model, config.img_size)


def make_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: bool,
) -> Callable[[], torch.Tensor]:
    """One training step on (x, y): forward (under bf16 autocast if asked), cross-entropy in
    float32, backward, optimizer step, zero_grad. Returns the loss, detached, on the device."""

    def step() -> torch.Tensor:
        context = (
            torch.autocast(x.device.type, dtype=torch.bfloat16)
            if autocast
            else contextlib.nullcontext()
        )
        with context:
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def saved_bytes(step: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors that one call of `step` saves for its backward, counted by a
    saved-tensors hook: each storage once (views share theirs), none of `exclude`'s (the
    model's parameters, in memory anyway). The lever on training memory that INT8 pulls, and
    one any device can count: an int8 copy saved in place of a float32 one is a quarter."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


@dataclasses.dataclass
class Running:
    """A setting compiled and warmed up, its model and optimizer alive, waiting for its turns in
    the timed rounds (`run_steps`)."""

    setting: Setting
    model: torch.nn.Module
    step: Callable[[], torch.Tensor]
    first_step_ms: float
    compile_phases: dict[str, float]
    peak_memory_bytes: int | None
    rewritten_ops: int | None
    gemm_speedups: tuple[dict[str, Any], ...]


def start_setting(
    setting: Setting,
    model0: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    config: BenchConfig,
    clock: Clock,
) -> Running:
    """Train a copy of model0 on `batch` under `setting`: its first step (compiling, timed with
    torch's compile metrics) and the rest of its warm-up. The peak memory counts from here, so
    the settings started before, still alive, are not counted in it."""
    device = clock.device
    release(device)
    resident = torch.cuda.memory_allocated(device) if clock.cuda else 0
    model = copy.deepcopy(model0).to(device).train()
    counter = None
    if setting.compiler == "gradq":
        # Each gradq setting times its GEMMs and tunes its kernels afresh, as a new process
        # would: its compile time must not lean on an earlier setting's.
        fallback.reset()
        kernels.reset_autotuning()
        counter = GradQBackend("gradq")
        options = dict(config.options) | dict(setting.options)
        net = torch.compile(model, backend=counter, options=options)
    elif setting.compiler == "inductor":
        net = torch.compile(model)
    else:
        net = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = (t.to(device) for t in batch)
    step = make_step(net, optimizer, x, y, setting.autocast)

    say(f"{setting.name}: first step" + (" (compiling)..." if setting.compiler else "..."))
    before = compile_metrics()
    _, first_ms = clock.wall_ms(step)
    phases = {k: v - before.get(k, 0.0) for k, v in compile_metrics().items()}
    if counter is not None and counter.graphs == 0:
        raise RuntimeError("gradq's backend never ran: the model trained in float")
    for _ in range(config.warmup - 1):
        step()
    first = f"{first_ms / 1e3:.1f} s" if first_ms >= 1e3 else f"{first_ms:.0f} ms"
    say(f"{setting.name}: first step {first}")
    peak = torch.cuda.max_memory_allocated(device) - resident if clock.cuda else None
    # Only gradq settings reset and fill the fallback's measurements.
    timed_gemms = ()
    if counter is not None:
        timed_gemms = tuple(dataclasses.asdict(m) for m in fallback.measurements())
    return Running(
        setting=setting,
        model=model,
        step=step,
        first_step_ms=first_ms,
        compile_phases={k: v for k, v in phases.items() if v > 0} if setting.compiler else {},
        peak_memory_bytes=peak,
        rewritten_ops=counter.rewritten if counter is not None else None,
        gemm_speedups=timed_gemms,
    )


def time_in_rounds(
    running: Mapping[str, Running], iters: int, clock: Clock
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Each setting's step times over `iters` rounds, one step of every setting per round (the
    order reversed every other round), after one untimed round: a drift of the machine's speed
    during the run then lands on every setting alike, not on the settings timed last. The
    untimed round also re-tunes what a later gradq setting's `reset_autotuning` made an
    earlier one forget. Returns the samples and, for a setting whose step raised, its error
    (it leaves the rounds)."""
    samples: dict[str, list[float]] = {name: [] for name in running}
    errors: dict[str, str] = {}
    say(f"timing {iters} rounds of {', '.join(running)}...")
    for round_ in range(-1, iters):
        order = list(running) if round_ % 2 == 0 else list(reversed(running))
        for name in order:
            if name in errors:
                continue
            try:
                if round_ < 0:
                    running[name].step()
                else:
                    samples[name] += clock.time(running[name].step, 1)
            except Exception as error:  # record it; the other settings go on
                say(f"{name}: failed while timed")
                errors[name] = log_failure(error)
    return samples, errors


def finish_setting(running: Running, samples: list[float], config: BenchConfig) -> SettingResult:
    """A timed setting's result: the summary of its samples, its saved bytes and last loss."""
    ms = Summary.of(samples)
    say(f"{running.setting.name}: {ms.median:.2f} ms/step")
    # After timing (no hook there); the final loss is this step's.
    last_loss = []
    saved = saved_bytes(
        lambda: last_loss.append(running.step()), exclude=running.model.parameters()
    )
    compiled = running.setting.compiler is not None
    return SettingResult(
        setting=running.setting.name,
        samples_ms=tuple(samples),
        ms=ms,
        images_per_s=config.batch_size * 1e3 / ms.median,
        peak_memory_bytes=running.peak_memory_bytes,
        saved_bytes=saved,
        first_step_ms=running.first_step_ms,
        compile_s=(running.first_step_ms - ms.median) / 1e3 if compiled else None,
        final_loss=last_loss[0].item(),
        rewritten_ops=running.rewritten_ops,
        gemm_speedups=running.gemm_speedups,
        compile_phases=running.compile_phases,
    )


def compile_metrics() -> dict[str, float]:
    """Seconds spent so far in each of torch's timed compile stages (`dynamo_timed`)."""
    from torch._dynamo.utils import compilation_time_metrics

    return {key: sum(values) for key, values in compilation_time_metrics.items()}


def start_compiler(clock: Clock) -> float:
    """Compile and run a tiny forward and backward with Inductor on the clock's device; its
    wall time in seconds. A process's first compile pays one-off costs (imports, the C++
    compiler's checks and precompiled header, Triton's start) that later compiles do not:
    paid here, they fall on no setting's first step, so each compiles in a process that has
    compiled before, whatever its place in the order."""

    def tiny(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(F.gelu(x @ w), (w.shape[1],)).softmax(-1).sum()

    x = torch.randn(8, 16, device=clock.device)
    w = torch.randn(16, 16, device=clock.device, requires_grad=True)
    _, ms = clock.wall_ms(lambda: torch.compile(tiny)(x, w).backward())
    return ms / 1e3


@contextlib.contextmanager
def cold_compiles():
    """No FX graph, AOTAutograd or profile-guided cache hit from an earlier run: compile time
    measured as a first compile on this machine would take."""
    with torch._inductor.config.patch(force_disable_caches=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # that is the aim
        yield


def run_steps(config: BenchConfig, device: torch.device, command: str) -> StepReport:
    """The step benchmark of a resolved config: every setting, then the speed-ups."""
    clock = Clock(device)
    model0, size = _build_model(config)
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn(config.batch_size, 3, size, size, generator=generator)
    y = torch.randint(config.num_classes, (config.batch_size,), generator=generator)
    results: dict[str, SettingResult] = {}
    running: dict[str, Running] = {}
    torch._dynamo.reset()  # compiles of an earlier run in this process are not reused
    # Every setting stays compiled until the timed rounds end: each compiled copy of the model
    # is one more cache entry of the same code for Dynamo.
    limit = max(torch._dynamo.config.recompile_limit, 4 * len(config.settings))
    start_up_s = None
    with cold_compiles(), torch._dynamo.config.patch(recompile_limit=limit):
        if any(SETTINGS[name].compiler for name in config.settings):
            say("compiler start-up (a tiny compile before the first setting)...")
            try:
                start_up_s = start_compiler(clock)
                say(f"compiler start-up {start_up_s:.1f} s")
            except Exception as error:  # the settings still run, and fail with their own error
                say(f"compiler start-up failed: {log_failure(error)}")
        for name in config.settings:
            try:
                running[name] = start_setting(SETTINGS[name], model0, (x, y), config, clock)
            except Exception as error:  # record it; the other settings still run
                say(f"{name}: failed")
                results[name] = SettingResult(setting=name, error=log_failure(error))
        samples, errors = time_in_rounds(running, config.iters, clock)
        for name, run in running.items():
            if name in errors:
                results[name] = SettingResult(setting=name, error=errors[name])
                continue
            try:
                results[name] = finish_setting(run, samples[name], config)
            except Exception as error:
                say(f"{name}: failed")
                results[name] = SettingResult(setting=name, error=log_failure(error))
    results = {name: results[name] for name in config.settings}  # in the settings' order
    running.clear()
    release(device)
    medians = {name: r.ms.median for name, r in results.items() if r.ms is not None}
    ratios = speedups(medians)
    results = {
        name: dataclasses.replace(r, speedup=ratios.get(name, {})) for name, r in results.items()
    }
    notes = {
        "speedup": "baseline's median ms per step / this setting's",
        "samples_ms": "one step per setting per round, the order reversed every other round, "
        "after every setting's warm-up and one untimed round of all",
        "compile_s": "compiled settings: wall time of the first step (which compiles) less the "
        "median step; Inductor's caches disabled, gradq's kernels tuned afresh per setting, "
        "the process's one-off compiler start-up paid before the first setting "
        "(timing.compiler_start_up_s), "
        "Triton's binaries of identical kernels shared with earlier settings",
        "saved_bytes": "what one step's forward keeps for backward: each storage once, the "
        "parameters excepted (a saved-tensors hook on a step after timing)",
        "gemm_speedups": "gradq on CUDA: float ms / INT8 ms of each GEMM signature, timed "
        "while compiling (gradq_fx.fallback); below 1 the GEMM runs in float (the table's "
        "fallback column: k of n)",
    }
    if not clock.cuda:
        notes["peak_memory"] = (
            "not measured on the CPU: torch keeps allocator statistics (max_memory_allocated) "
            "for CUDA only"
        )
    return StepReport(
        environment=environment(device, command),
        model={
            **model_info(config, size),
            "parameters": sum(p.numel() for p in model0.parameters()),
        },
        timing={
            **timing_info(config, clock),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "compiler_start_up_s": start_up_s,
        },
        gradq_options={k: list(v) if isinstance(v, tuple) else v for k, v in config.options},
        results=results,
        notes=notes,
    )


def step_table(report: StepReport) -> str:
    """The step results as one text table ("n/a" where not measured)."""
    baselines = [b for b in BASELINES if b in report.results and report.results[b].ms]
    headers = ["setting", "ms/step", "q1-q3 ms", "images/s"]
    headers += [f"vs {b}" for b in baselines]
    headers += ["peak MiB", "saved MiB", "compile s", "rewritten", "fallback"]
    rows = []
    for name, r in report.results.items():
        if r.ms is None:
            rows.append([name, f"failed: {r.error}"])
            continue
        rows.append(
            [
                name,
                r.ms.median,
                f"{r.ms.q1:.2f}-{r.ms.q3:.2f}",
                r.images_per_s,
                *(format_ratio(r.speedup.get(b)) for b in baselines),
                None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**20,
                None if r.saved_bytes is None else r.saved_bytes / 2**20,
                r.compile_s,
                r.rewritten_ops,
                r.fallbacks,
            ]
        )
    return tabulate(rows, headers=headers, floatfmt=".2f", missingval="n/a")


def phase_table(report: StepReport) -> str | None:
    """Where each compiled setting's first step went, in seconds (`PHASES`); None when no
    setting compiled."""
    compiled = {name: r for name, r in report.results.items() if r.compile_phases}
    if not compiled:
        return None
    rows = [["first step (wall)", *(r.first_step_ms / 1e3 for r in compiled.values())]]
    for label, key in PHASES.items():
        rows.append([label, *(r.compile_phases.get(key) for r in compiled.values())])
    return tabulate(rows, headers=["seconds", *compiled], floatfmt=".2f", missingval="-")
