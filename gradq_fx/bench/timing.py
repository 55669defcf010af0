"""How `bench` measures: `Clock` (CUDA events on CUDA, `time.perf_counter` on the CPU),
`Summary` (median and quartiles of the samples), and `release` (a clean start for the
device's memory between measurements).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Summary:
    """Median, quartiles (linear interpolation, as numpy's default) and range of samples in ms."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    count: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        if not samples:
            raise ValueError("Summary.of: no samples")
        values = sorted(float(s) for s in samples)
        q1, q3 = values[0], values[0]
        if len(values) > 1:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, values[0], values[-1], len(values))


class Clock:
    """Times calls on one device: CUDA events on CUDA (work is queued asynchronously, so the
    host clock would time the queueing), `time.perf_counter` on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.name = "cuda events" if self.cuda else "time.perf_counter"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def wall_ms(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """fn()'s result and its wall time in ms, the device synchronised on both sides."""
        self.synchronize()
        start = time.perf_counter()
        result = fn()
        self.synchronize()
        return result, (time.perf_counter() - start) * 1e3

    def time(
        self, fn: Callable[[], Any], iters: int, before: Callable[[], Any] | None = None
    ) -> list[float]:
        """Milliseconds of each of `iters` calls of fn; `before` runs untimed before each."""
        if self.cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            for start, end in zip(starts, ends, strict=True):
                if before is not None:
                    before()
                start.record()
                fn()
                end.record()
            self.synchronize()
            return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]
        samples = []
        for _ in range(iters):
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return samples


def release(device: torch.device) -> None:
    """Free what earlier settings left, and start the peak-memory count afresh."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
