"""The kernel benchmark: each precision's peak (a large square GEMM), then for each linear
shape of the model the quantize, IQR clip and GEMM candidates of `gradq_fx.bench.candidates`,
checked and then timed with a cold L2 cache on CUDA; `KernelReport` (kernels.json) and its text
tables.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from tabulate import tabulate

from gradq_fx.bench.candidates import (
    CLIP_CANDIDATES,
    CLIP_SPEC,
    GEMM_SPEC,
    KERNEL_CANDIDATES,
    QUANTIZE_CANDIDATES,
    GemmProblem,
    check_result,
    gemm_problems,
    int_mm_function,
    linear_shapes,
)
from gradq_fx.bench.config import BenchConfig
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
from gradq_fx.quantizer import clip_value, quantize
from gradq_fx.train.model import create_model


@dataclasses.dataclass(frozen=True)
class Timed:
    """One timed kernel call: what it was, whether it ran, and its rates."""

    name: str  # the shape's layers, or the precision of a peak measurement
    role: str  # forward / dgrad / wgrad; "quantize"; "iqr clip dgrad" / "wgrad"; "peak"
    candidate: str
    m: int
    k: int
    n: int
    status: str  # "ok", "skipped" (not available here) or "failed" (see error)
    error: str | None = None
    ms: Summary | None = None
    tops: float | None = None  # tera-operations per second, 2 m n k per GEMM
    gbps: float | None = None  # operands read and results written, per second
    percent_of_peak: float | None = None  # of the measured peak of the candidate's precision
    vs_bf16: float | None = None  # bf16's median / this one's, same shape

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Timed:
        return cls(**decoded(data, {"ms": summary_or_none}))


def _timed_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[Timed, ...]:
    return tuple(Timed.from_dict(row) for row in rows)


@dataclasses.dataclass(frozen=True)
class KernelReport(Report):
    """kernels.json: Report's fields (the model's with its linear shapes), then the measured
    peaks, the per-row steps (activation quantize, gradient IQR clips: `quantize`) and the GEMM
    timings, one row per shape, role and candidate."""

    MODE: ClassVar[str] = "kernels"
    DECODERS: ClassVar[dict[str, Callable]] = dict.fromkeys(
        ("peaks", "quantize", "gemms"), _timed_rows
    )

    peaks: tuple[Timed, ...] = ()
    quantize: tuple[Timed, ...] = ()
    gemms: tuple[Timed, ...] = ()

    @property
    def failed(self) -> bool:
        return any(t.status == "failed" for t in self.peaks + self.quantize + self.gemms)


class KernelTimer:
    """Times kernel calls; on CUDA each timed call starts with a cold L2 cache (a 256 MiB
    buffer is overwritten before it), as a GEMM inside a training step would."""

    def __init__(self, config: BenchConfig, device: torch.device):
        self.clock = Clock(device)
        self.config = config
        self.flush = None
        if self.clock.cuda:
            buffer = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
            self.flush = buffer.zero_

    def __call__(self, fn: Callable[[], Any]) -> Summary:
        for _ in range(self.config.warmup):
            fn()
        self.clock.synchronize()
        return Summary.of(self.clock.time(fn, self.config.iters, before=self.flush))


def measure_peak(precision: str, size: int, timer: KernelTimer, device: torch.device) -> Timed:
    """The TOP/s of a size^3 GEMM in `precision` (bf16: torch.mm; int8: as int_mm does)."""
    generator = torch.Generator().manual_seed(0)
    if precision == "bf16":
        a = torch.randn(size, size, generator=generator).to(device, torch.bfloat16)
        b = torch.randn(size, size, generator=generator).to(device, torch.bfloat16)
        fn = functools.partial(torch.mm, a, b)
    else:
        a = torch.randint(-127, 128, (size, size), generator=generator, dtype=torch.int8)
        b = torch.randint(-127, 128, (size, size), generator=generator, dtype=torch.int8)
        a, b = a.to(device), b.to(device).t().contiguous().t()
        fn = functools.partial(int_mm_function(a, b), a, b)
    ms = timer(fn)
    tops = 2 * size**3 / (ms.median * 1e-3) / 1e12
    return Timed(precision, "peak", "torch", size, size, size, "ok", ms=ms, tops=tops)


def time_quantize(x: torch.Tensor, layers: str, timer: KernelTimer) -> list[Timed]:
    """Each quantize candidate on the activation x [M, K], checked against `quantize` first."""
    q_ref, scale_ref = quantize(x, GEMM_SPEC, dim=-1)
    moved = x.numel() * (x.element_size() + 1) + scale_ref.numel() * 4  # read x; write q, scales
    rows = []
    for name, prepare in QUANTIZE_CANDIDATES.items():
        base = dict(name=layers, role="quantize", candidate=name, m=x.shape[0], k=x.shape[1], n=0)
        call = prepare(x)
        if call is None:
            rows.append(Timed(**base, status="skipped", error="not available"))
            continue
        try:
            q, scale = call()
            if not (torch.equal(q, q_ref) and torch.equal(scale.flatten(), scale_ref.flatten())):
                raise AssertionError("codes or scales differ from gradq_fx.quantizer.quantize")
            ms = timer(call)
        except Exception as error:
            rows.append(Timed(**base, status="failed", error=log_failure(error)))
            continue
        gbps = moved / (ms.median * 1e-3) / 1e9
        rows.append(Timed(**base, status="ok", ms=ms, gbps=gbps))
    return rows


# A clip "agrees" with clip_value's when within this relative distance: the same fence up to
# the device's log2 / exp2 (distinct fences are percents apart; kernels/iqr.py).
CLIP_AGREEMENT = 1e-4


def time_iqr_clip(g: torch.Tensor, layers: str, role: str, timer: KernelTimer) -> list[Timed]:
    """Each IQR clip candidate on gradient rows g [R, C] (dY's rows for dgrad, dY^T's for
    wgrad), checked against eager `clip_value` first: at least 95% of rows must pick its fence
    (the others may break near ties of the cosine the other way)."""
    want = clip_value(g.float(), CLIP_SPEC)
    moved = g.numel() * g.element_size() + want.numel() * 4  # read g once; write the clips
    m, k = g.shape
    rows = []
    for name, prepare in CLIP_CANDIDATES.items():
        base = dict(name=layers, role=f"iqr clip {role}", candidate=name, m=m, k=k, n=0)
        try:
            call = prepare(g)
            agree = ((call() - want).abs() <= CLIP_AGREEMENT * want).float().mean().item()
            if agree < 0.95:
                raise AssertionError(f"{agree:.0%} of rows agree with clip_value's fence")
            ms = timer(call)
        except Exception as error:
            rows.append(Timed(**base, status="failed", error=log_failure(error)))
            continue
        rows.append(Timed(**base, status="ok", ms=ms, gbps=moved / (ms.median * 1e-3) / 1e9))
    return rows


def _operand_bytes(problem: GemmProblem, precision: str) -> int:
    tensors = (problem.a, problem.b)
    if precision == "int8":
        tensors = (problem.q_a, problem.q_b, problem.scale_a, problem.scale_b)
    return sum(t.numel() * t.element_size() for t in tensors)


def time_gemm(
    problem: GemmProblem,
    candidates: Sequence[str],
    timer: KernelTimer,
    peaks: Mapping[str, Timed],
) -> list[Timed]:
    """Each candidate on one GEMM problem: checked, then timed; rates against the peaks."""
    m, k, n = problem.mkn
    rows = []
    for name in candidates:
        candidate = KERNEL_CANDIDATES[name]
        base = dict(name=problem.layers, role=problem.role, candidate=name, m=m, k=k, n=n)
        call = candidate.prepare(problem)
        if call is None:
            rows.append(Timed(**base, status="skipped", error="not available"))
            continue
        try:
            out = call()
            check_result(candidate, problem, out)
            ms = timer(call)
        except Exception as error:
            rows.append(Timed(**base, status="failed", error=log_failure(error)))
            continue
        seconds = ms.median * 1e-3
        tops = 2 * m * n * k / seconds / 1e12
        moved = _operand_bytes(problem, candidate.precision) + out.numel() * out.element_size()
        peak = peaks.get(candidate.precision)
        rows.append(
            Timed(
                **base,
                status="ok",
                ms=ms,
                tops=tops,
                gbps=moved / seconds / 1e9,
                percent_of_peak=100 * tops / peak.tops if peak and peak.tops else None,
            )
        )
    bf16 = next((r for r in rows if r.candidate == "bf16" and r.ms), None)
    if bf16 is None:
        return rows
    return [
        dataclasses.replace(r, vs_bf16=bf16.ms.median / r.ms.median) if r.ms else r for r in rows
    ]


def run_kernels(config: BenchConfig, device: torch.device, command: str) -> KernelReport:
    """The kernel benchmark of a resolved config: peaks, then each shape's quantize and GEMMs."""
    timer = KernelTimer(config, device)
    with torch.device("meta"):
        model = create_model(
            config.model, config.num_classes, config.img_size, config.patch_size, config.depth
        )
    size = input_size(model, config.img_size)
    shapes = linear_shapes(model.train(), config.batch_size, size)
    precisions = {KERNEL_CANDIDATES[name].precision: None for name in config.candidates}
    peaks = {}
    for precision in precisions:
        say(f"peak: {precision} {config.peak_size}^3 GEMM...")
        peaks[precision] = measure_peak(precision, config.peak_size, timer, device)
    quantize_rows, gemm_rows = [], []
    for index, shape in enumerate(shapes):
        problems = gemm_problems(shape, config.max_tokens, device, config.seed + index)
        m, k, n = problems[0].mkn
        say(f"{shape.layers}: M={m} K={k} N={n}...")
        quantize_rows += time_quantize(problems[0].a, shape.layers, timer)
        for problem in problems[1:]:  # dgrad's a is dY [M, N], wgrad's dY^T [N, M]
            quantize_rows += time_iqr_clip(problem.a, shape.layers, problem.role, timer)
        for problem in problems:
            gemm_rows += time_gemm(problem, config.candidates, timer, peaks)
        del problems
        release(device)
    notes = {
        "shapes": "one forward pass with hooks on every nn.Linear; forward is [M,K]x[K,N], dgrad "
        "[M,N]x[N,K], wgrad [N,M]x[M,K] (M tokens, K in, N out features)",
        "tops": "2*m*n*k / median time; gbps: operand, scale and result bytes / median time",
        "percent_of_peak": "of the peak row of the candidate's precision (a square GEMM)",
        "check": "bf16: SQNR against a float32 GEMM; int8: equal to quantized_matmul bit for bit",
    }
    if config.max_tokens:
        notes["max_tokens"] = f"M capped at {config.max_tokens} tokens"
    return KernelReport(
        environment=environment(device, command),
        model={
            **model_info(config, size),
            "linear_shapes": [dataclasses.asdict(s) for s in shapes],
        },
        timing={
            **timing_info(config, timer.clock),
            "cold_l2": timer.flush is not None,
            "candidates": list(config.candidates),
            "max_tokens": config.max_tokens,
        },
        peaks=tuple(peaks.values()),
        quantize=tuple(quantize_rows),
        gemms=tuple(gemm_rows),
        notes=notes,
    )


def _mkn(t: Timed) -> str:
    return f"{t.m}x{t.k}" + (f"x{t.n}" if t.n else "")


def _g(value: float | None, digits: int = 4) -> str | None:
    return None if value is None else f"{value:.{digits}g}"


def kernel_tables(report: KernelReport) -> str:
    """Peaks, quantize and GEMM results as three text tables (4 significant digits)."""

    def median(t: Timed) -> str:
        return _g(t.ms.median) if t.ms else t.status

    peaks = [[t.name, _mkn(t), median(t), _g(t.tops)] for t in report.peaks]
    quantize_rows = [
        [t.name, t.role, _mkn(t), t.candidate, median(t), _g(t.gbps)] for t in report.quantize
    ]
    gemms = [
        [t.name, t.role, _mkn(t), t.candidate, median(t), _g(t.tops), _g(t.gbps)]
        + [_g(t.percent_of_peak, 3), format_ratio(t.vs_bf16)]
        for t in report.gemms
    ]
    gemm_headers = ["layers", "role", "MxKxN", "candidate", "ms", "TOP/s", "GB/s", "% peak"]
    return "\n\n".join(
        [
            tabulate(peaks, headers=["peak", "MxKxN", "ms", "TOP/s"]),
            tabulate(
                quantize_rows,
                headers=["layers", "per-row step", "rows x cols", "candidate", "ms", "GB/s"],
            ),
            tabulate(gemms, headers=[*gemm_headers, "vs bf16"], missingval="n/a"),
        ]
    )
