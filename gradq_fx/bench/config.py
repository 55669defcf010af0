"""What a `bench` run is asked to do: the step benchmark's settings, `BenchConfig` (each field a
flag, validated on construction, ValueError naming the flag), the per-device defaults it
resolves to, the device itself, and the argparse flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

import timm
import torch

from gradq_fx.bench.candidates import KERNEL_CANDIDATES, check_candidates, parse_candidates
from gradq_fx.cli import parse_option
from gradq_fx.config import GradQConfig

DEVICES = ("auto", "cpu", "cuda")


# Settings of the step benchmark.


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way to run the training step: bf16 autocast or not, and which compiler."""

    name: str
    autocast: bool
    compiler: str | None  # None (eager), "inductor" or "gradq"
    # gradq options this setting fixes, over --option's: (key, value) pairs.
    options: tuple[tuple[str, str], ...] = ()
    default: bool = True  # run when --settings is not given


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("fp32-eager", autocast=False, compiler=None),
        Setting("bf16-eager", autocast=True, compiler=None),
        Setting("bf16-compile", autocast=True, compiler="inductor"),
        Setting("gradq", autocast=True, compiler="gradq"),
        # The other kernel lowering: both are measured, the faster should be the default.
        Setting("gradq-fused", autocast=True, compiler="gradq", options=(("lowering", "fused"),)),
        # Without autocast: compile time and steps against plain torch.compile in float32.
        Setting("fp32-compile", autocast=False, compiler="inductor", default=False),
        Setting("gradq-fp32", autocast=False, compiler="gradq", default=False),
    )
}


DEFAULT_SETTINGS = tuple(name for name, setting in SETTINGS.items() if setting.default)


def parse_settings(text: str) -> tuple[str, ...]:
    """'gradq,bf16-compile' -> the named settings in `SETTINGS` order; ValueError on bad names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    return check_settings(names)


def check_settings(names: Sequence[str]) -> tuple[str, ...]:
    """The settings `names` in `SETTINGS` order; ValueError naming --settings on a bad list."""
    valid = ", ".join(SETTINGS)
    if not names:
        raise ValueError(f"--settings: give at least one setting (valid: {valid})")
    unknown = [name for name in names if name not in SETTINGS]
    if unknown:
        raise ValueError(f"--settings: unknown setting(s) {unknown} (valid: {valid})")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--settings: {repeated} given more than once (valid: {valid})")
    return tuple(name for name in SETTINGS if name in names)


# The configuration.


@dataclasses.dataclass(frozen=True)
class DeviceDefaults:
    """What a flag left out means on one device type."""

    model: str
    img_size: int | None  # for the default model only; None: the model's own
    patch_size: int | None  # likewise
    batch_size: int
    num_classes: int
    max_tokens: int | None  # --kernels: cap on M (None: no cap)
    peak_size: int  # --kernels: side of the square GEMM that measures the peak


DEFAULTS = {
    # DeiT-B at 224 px, batch 128: the step gradq's GPU speed target is set on (M = 128 * 197).
    "cuda": DeviceDefaults("deit_base_patch16_224", None, None, 128, 1000, None, 8192),
    # A tiny ViT (6 blocks, width 64, 50 tokens) so that CPU runs finish.
    "cpu": DeviceDefaults("test_vit", 28, 4, 8, 10, 2048, 512),
}
# Flags of one mode only: left at None in the other.
STEP_ONLY = ("settings", "options")
KERNELS_ONLY = ("candidates", "max_tokens", "peak_size")


def flag(field: str) -> str:
    """The command-line flag of a BenchConfig field."""
    return "--" + {"options": "option"}.get(field, field).replace("_", "-")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. None means the device's default (`DEFAULTS`); `resolved` fills them."""

    model: str | None = None
    img_size: int | None = None
    patch_size: int | None = None
    depth: int | None = None
    batch_size: int | None = None
    num_classes: int | None = None
    settings: tuple[str, ...] | None = None  # None: all of SETTINGS
    options: tuple[tuple[str, Any], ...] | None = None  # gradq's options, (key, value) pairs
    kernels: bool = False
    candidates: tuple[str, ...] | None = None  # None: all of KERNEL_CANDIDATES
    max_tokens: int | None = None
    peak_size: int | None = None
    warmup: int = 5
    iters: int = 30
    seed: int = 0
    device: str = "auto"
    out: str = "out/bench"

    def __post_init__(self):
        optional_positive = (
            "img_size",
            "patch_size",
            "depth",
            "batch_size",
            "num_classes",
            "max_tokens",
            "peak_size",
        )
        for field in (*optional_positive, "warmup", "iters", "seed"):
            value = getattr(self, field)
            if value is None and field in optional_positive:
                continue
            low = 0 if field == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{flag(field)} must be an integer >= {low}, got {value!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {list(DEVICES)}, got {self.device!r}")
        if self.model is not None and not timm.is_model(self.model):
            raise ValueError(f"--model: unknown timm model {self.model!r} (see timm.list_models())")
        for field in STEP_ONLY if self.kernels else KERNELS_ONLY:
            if getattr(self, field) is not None:
                mode = "the step benchmark" if self.kernels else "--kernels"
                raise ValueError(f"{flag(field)} applies to {mode} only")
        if self.settings is not None:
            object.__setattr__(self, "settings", check_settings(list(self.settings)))
        if self.options is not None:
            object.__setattr__(self, "options", tuple(tuple(pair) for pair in self.options))
            try:
                GradQConfig.from_options(dict(self.options))
            except ValueError as error:
                raise ValueError(f"--option: {error}") from error
        if self.candidates is not None:
            object.__setattr__(self, "candidates", check_candidates(list(self.candidates)))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        """The config of parsed `bench` arguments (`add_arguments`)."""
        values = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)}
        values["options"] = tuple(args.options) if args.options else None
        # Lists are parsed here, not by argparse, whose type errors hide the message.
        if args.settings is not None:
            values["settings"] = parse_settings(args.settings)
        if args.candidates is not None:
            values["candidates"] = parse_candidates(args.candidates)
        return cls(**values)

    def resolved(self, device: torch.device) -> BenchConfig:
        """This config with the defaults of `device` filled in (model, batch, classes...)."""
        defaults = DEFAULTS[device.type]
        default_model = self.model is None

        def pick(field: str, model_specific: bool = False):
            value = getattr(self, field)
            if value is not None or (model_specific and not default_model):
                return value
            return getattr(defaults, field)

        return dataclasses.replace(
            self,
            device=device.type,
            model=pick("model"),
            img_size=pick("img_size", model_specific=True),
            patch_size=pick("patch_size", model_specific=True),
            batch_size=pick("batch_size"),
            num_classes=pick("num_classes"),
            settings=self.settings or (None if self.kernels else DEFAULT_SETTINGS),
            options=self.options or (None if self.kernels else ()),
            candidates=self.candidates or (tuple(KERNEL_CANDIDATES) if self.kernels else None),
            max_tokens=pick("max_tokens") if self.kernels else None,
            peak_size=pick("peak_size") if self.kernels else None,
        )


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when present), 'cpu' or 'cuda'; ValueError for CUDA without a GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m gradq_fx bench`, one per BenchConfig field."""
    d = BenchConfig()
    model = parser.add_argument_group(
        "model",
        "Defaults: deit_base_patch16_224 at 224 px, batch 128, 1000 classes on CUDA; "
        "test_vit at 28 px with patch 4, batch 8, 10 classes on the CPU.",
    )
    model.add_argument("--model", help="a timm model name (initialised from scratch)")
    model.add_argument("--img-size", type=int, help="input size in px (default: the model's)")
    model.add_argument(
        "--patch-size", type=int, help="timm's patch_size, where the model takes one"
    )
    model.add_argument("--depth", type=int, help="number of blocks (timm's depth)")
    model.add_argument("--batch-size", type=int)
    model.add_argument("--num-classes", type=int)

    step = parser.add_argument_group("step benchmark (the default)")
    step.add_argument(
        "--settings",
        metavar="LIST",
        help=f"comma-separated subset of {', '.join(SETTINGS)} "
        f"(default: {','.join(DEFAULT_SETTINGS)})",
    )
    step.add_argument(
        "--option",
        dest="options",
        action="append",
        type=parse_option,
        metavar="KEY=VALUE",
        help="a gradq option for the gradq setting, e.g. attention=int8 (repeatable)",
    )

    kernels = parser.add_argument_group("kernel benchmark")
    kernels.add_argument(
        "--kernels", action="store_true", help="time the model's GEMMs and quantize steps alone"
    )
    kernels.add_argument(
        "--candidates",
        metavar="LIST",
        help=f"GEMM candidates, comma-separated, of {', '.join(KERNEL_CANDIDATES)} (default: "
        "all; one whose kernel is not available is skipped)",
    )
    kernels.add_argument(
        "--max-tokens",
        type=int,
        metavar="M",
        help="cap on the tokens (GEMM rows) of each shape (default: none on CUDA, 2048 on CPU)",
    )
    kernels.add_argument(
        "--peak-size",
        type=int,
        metavar="N",
        help="the N x N x N GEMM that measures each precision's peak (default: 8192 on CUDA, "
        "512 on CPU)",
    )

    run = parser.add_argument_group("timing and output")
    run.add_argument(
        "--warmup", type=int, default=d.warmup, help="untimed steps, the first included"
    )
    run.add_argument("--iters", type=int, default=d.iters, help="timed steps (or GEMM calls)")
    run.add_argument("--seed", type=int, default=d.seed, help="weights and the synthetic batch")
    run.add_argument("--device", choices=DEVICES, default=d.device)
    run.add_argument("--out", default=d.out, metavar="DIR", help="where the JSON and PNG go")
