"""What `bench` reports, in either mode: progress and failures on stderr, the run's environment
and the JSON's `model` and `timing` sections, the JSON schema (`SCHEMA`, `Report`, which
`StepReport` and `KernelReport` extend), and what the text tables share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import timm
import torch

from gradq_fx.bench.config import BenchConfig
from gradq_fx.bench.timing import Clock, Summary

SCHEMA = "gradq-bench/1"


def say(message: str) -> None:
    """A line of progress on stderr."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def log_failure(error: BaseException) -> str:
    """Print the traceback on stderr; return the one line the JSON records."""
    traceback.print_exception(error, file=sys.stderr)
    return f"{type(error).__name__}: {error}"


# What the JSON records about the run.


def device_info(device: torch.device) -> dict[str, Any]:
    """The device's type and name (CUDA: capability and memory; CPU: cores and threads)."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "capability": list(torch.cuda.get_device_capability(device)),
            "memory_bytes": properties.total_memory,
        }
    return {
        "type": "cpu",
        "name": _cpu_name(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def _cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, command: str) -> dict[str, Any]:
    """Date, command line, device and versions: what a reader needs to rerun the numbers."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": device_info(device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "timm": timm.__version__,
            "gradq_fx": _version("gradq-fx"),
        },
    }


def input_size(model: torch.nn.Module, img_size: int | None) -> int:
    """The side in px of the run's input images: img_size, else the model's own."""
    return img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]


def model_info(config: BenchConfig, size: int) -> dict[str, Any]:
    """The JSON's `model`: what was benchmarked (size: the input size used)."""
    fields = ("patch_size", "depth", "num_classes", "batch_size")
    return {"name": config.model, "img_size": size} | {f: getattr(config, f) for f in fields}


def timing_info(config: BenchConfig, clock: Clock) -> dict[str, Any]:
    """The JSON's `timing`: how many calls were warm-up and timed, and by which clock."""
    return {
        "warmup": config.warmup,
        "iters": config.iters,
        "clock": clock.name,
        "seed": config.seed,
    }


# The JSON schema.


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


def decoded(data: Mapping[str, Any], decoders: Mapping[str, Callable]) -> dict[str, Any]:
    """`data` with each field named in `decoders` rebuilt from its JSON form (None stays)."""
    fields = dict(data)
    for key, decode in decoders.items():
        if fields.get(key) is not None:
            fields[key] = decode(fields[key])
    return fields


def summary_or_none(data: Mapping[str, Any] | None) -> Summary | None:
    return None if data is None else Summary(**data)


@dataclasses.dataclass(frozen=True)
class Report:
    """What the JSON of either mode holds besides its results: the environment, the model,
    the timing settings, and notes on what the numbers mean. `to_dict` adds the schema and
    mode; `from_dict` checks them and rebuilds the dataclasses."""

    MODE: ClassVar[str] = ""
    DECODERS: ClassVar[dict[str, Callable]] = {}

    environment: dict[str, Any]
    model: dict[str, Any]
    timing: dict[str, Any]
    notes: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "mode": self.MODE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        if data.get("schema") != SCHEMA or data.get("mode") != cls.MODE:
            found = f"schema {data.get('schema')!r}, mode {data.get('mode')!r}"
            raise ValueError(f"not a {SCHEMA} {cls.MODE} report: {found}")
        fields = {field.name: data[field.name] for field in dataclasses.fields(cls)}
        return cls(**decoded(fields, cls.DECODERS))


# The text tables.


def format_ratio(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}x"
