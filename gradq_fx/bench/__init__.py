"""`python -m gradq_fx bench`: how fast a timm model trains with gradq, against the float
settings a user would otherwise pick, and how fast the GEMMs alone run.

Step mode (the default) times a whole training step (forward, cross-entropy, backward, AdamW
step, zero_grad) of one model, in one process, for each setting of `SETTINGS`:
- `fp32-eager`: the model as is;
- `bf16-eager`: under `torch.autocast(device, torch.bfloat16)`;
- `bf16-compile`: `torch.compile` (Inductor, default mode) under autocast;
- `gradq`: `torch.compile(backend="gradq", options=...)` under autocast;
- `gradq-fused`: the same with `lowering=fused` (Inductor's kernels quantize, fused into their
  producers; gradq's GEMM), so one table compares both kernel lowerings.
Every setting starts from a copy of the same freshly initialised model and trains on the same
synthetic batch. Each setting in turn takes its first step (which compiles, timed on its own)
and its warm-up steps, and stays alive; then, after one untimed round, `--iters` rounds time
one step of every setting each (the order reversed every other round; CUDA events on CUDA,
`time.perf_counter` on the CPU), so a drift of the machine's speed lands on all settings
alike. Samples are summarised by their median and quartiles; speed-ups are ratios of
medians. Peak memory is `torch.cuda.max_memory_allocated` during the setting's first and
warm-up steps, less what the settings started before it hold (CUDA only); on every device,
one more step after timing counts the bytes its forward saves for backward
(`step.saved_bytes`); compile time is the first step's wall time less the median step.

Kernels mode (`--kernels`) times the GEMMs of the model's linear layers alone. The shapes come
from one forward pass on the meta device with hooks on every `nn.Linear` (tokens M, in K, out N),
and each gives three GEMMs: forward X[M,K] @ W^T[K,N], dgrad dY[M,N] @ W[N,K] and wgrad
dY^T[N,M] @ X[M,K], with the operand layouts training has. Each candidate of
`KERNEL_CANDIDATES` is checked against the reference numerics before it is timed (an INT8
candidate must equal `gradq_fx.quantizer.quantized_matmul` bit for bit), then reported in TOP/s,
GB/s, as a percentage of the peak measured with a large square GEMM of its precision, and
against bf16. The per-row quantize of each activation is timed too (GB/s), and the IQR clip
of each gradient's rows (dY's for dgrad, dY^T's for wgrad): eager torch, torch.compile (what
the reference lowering runs) and gradq's kernel (`kernels/iqr.py`, what the triton lowering runs).

Results go to stdout (tables) and to `--out` (`bench.json` and `bench.png`, or `kernels.json`
and `kernels.png`). A setting or candidate that fails is recorded with its error, the others
still run, and the command exits with status 1.

Modules: `config` (BenchConfig, the step settings, per-device defaults, the flags), `timing`
(Clock, Summary), `results` (environment, JSON schema, the Report base), `step` (the step
benchmark), `candidates` (linear shapes, GEMM problems, the GEMM and quantize candidates),
`kernels` (the kernel benchmark), `chart` (the bar charts); `run` here drives one of the two.
"""

from __future__ import annotations

from pathlib import Path

from gradq_fx.bench.chart import draw_bars, kernel_bars, step_bars
from gradq_fx.bench.config import BenchConfig, add_arguments, resolve_device
from gradq_fx.bench.kernels import KernelReport, kernel_tables, run_kernels
from gradq_fx.bench.results import device_info, say, write_json
from gradq_fx.bench.step import StepReport, phase_table, run_steps, step_table

__all__ = ["BenchConfig", "KernelReport", "StepReport", "add_arguments", "run"]


def run(config: BenchConfig, command: str = "") -> int:
    """Run the benchmark `config` asks for; print the tables, write JSON and PNG to `out`.
    Returns 0, or 1 when a setting or a candidate failed (the rest is still reported)."""
    device = resolve_device(config.device)
    config = config.resolved(device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    subject = f"{config.model}, batch {config.batch_size}, {device_info(device)['name']}"
    if config.kernels:
        report = run_kernels(config, device, command)
        print(kernel_tables(report))
        json_path, png_path = out / "kernels.json", out / "kernels.png"
        title = f"GEMM throughput: {subject}"
        draw_bars(png_path, title, "TOP/s (2 m n k / median time)", kernel_bars(report), True)
    else:
        report = run_steps(config, device, command)
        print(step_table(report))
        phases = phase_table(report)
        if phases is not None:
            print("\nWhere the first step went (torch's compile metrics, summed over graphs):")
            print(phases)
            start_up = report.timing.get("compiler_start_up_s")
            if start_up is not None:
                print(f"Before the first setting, the compiler's start-up: {start_up:.2f} s")
        json_path, png_path = out / "bench.json", out / "bench.png"
        title = f"training step: {subject}"
        draw_bars(
            png_path, title, "ms per step (median; whiskers: q1-q3)", step_bars(report), False
        )
    write_json(json_path, report.to_dict())
    say(f"wrote {json_path} and {png_path}")
    return 1 if report.failed else 0
