"""What a training run is: `TrainConfig`, its validation, and how each precision trains.

Every field is a command-line flag of `python -m gradq_fx train` (`img_size` is `--img-size`);
a bad value raises ValueError naming that flag.

Precisions:
- fp32: the model as is (eager, or `torch.compile` with Inductor under `--compile`);
- bf16: the same under `torch.autocast(device, torch.bfloat16)`;
- int8-naive: `torch.compile(backend=gradq or gradq_eager)` with absmax ("minmax") gradient
  clipping and no gradient scaling (round to nearest is gradq's default everywhere);
- gradq: the full GradQ-ViT method: gradq's default options, the outlier-robust loss
  (`gradq_fx.losses.ch_loss`) and the adaptive per-layer learning rate
  (`gradq_fx.stats.AdaptiveLR`, fed by the `stats` the quantizers record). `--no-iqr`,
  `--no-gradient-scaling`, `--no-ch-loss` and `--no-adaptive-lr` each drop one component.
int8-naive records no statistics (`stats=False`): nothing would read them.
`--option KEY=VALUE` options apply last, over the precision's own.

Low-bit QAT (Quantization Variation; docs/method.md), with any precision:
- `--weight-bits`, `--activation-bits` (2 to 8, default 8): the forward GEMMs' operand widths.
  Alone (INT8 precisions) they make gradq fake-quantize the forward GEMMs with its min-max
  quantizers below 8 bits;
- `--lsq`: LSQ quantizers with learnable step sizes at those widths on every Linear the
  gradq options select, except the head (kept at 8 bits, as the paper keeps it) unless
  `--option exclude=...` says otherwise (`gradq_fx.qat.attach_lsq`). LSQ is explicit, not
  implied by the widths, so LSQ and min-max low-bit training can be compared. With fp32 or
  bf16 the model trains with LSQ fake quantization and a float backward (the paper's setting);
  with the INT8 precisions the backward GEMMs stay INT8;
- `--obr` (needs `--lsq`): adds the oscillation-aware bin regularizer, weighted by
  `obr_lambda` (0 for the first quarter of the steps, then a cosine rise to 0.01);
- `--teacher PATH`: distil from a float (fp32 or bf16) checkpoint.pt of this command:
  the objective becomes `kd_loss` (soft cross-entropy on the teacher's probabilities, from the
  live teacher on the same augmented batch) instead of cross-entropy or ch_loss.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradq_fx.config import GradQConfig
from gradq_fx.train.schedule import OPTIMIZERS

PRECISIONS = ("fp32", "bf16", "int8-naive", "gradq")
INT8_PRECISIONS = ("int8-naive", "gradq")
BACKENDS = ("gradq", "gradq_eager")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.05}

# The gradq options of each INT8 precision, before the component flags and --option.
PRECISION_OPTIONS: dict[str, dict[str, Any]] = {
    "int8-naive": {"gradient_quantizer": "minmax", "gradient_scaling": False, "stats": False},
    "gradq": {"stats": True},  # the adaptive learning rate reads them
}
# Component flags: field -> the gradq option it sets (None: not an option, the loss).
COMPONENT_FLAGS: dict[str, tuple[str, Any] | None] = {
    "no_iqr": ("gradient_quantizer", "minmax"),
    "no_gradient_scaling": ("gradient_scaling", False),
    "no_ch_loss": None,
    "no_adaptive_lr": ("stats", False),  # and no AdaptiveLR: nothing reads the statistics
}
# Fields that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = frozenset(
    {"data_dir", "workers", "log_every", "out", "resume", "stop_after", "device", "dist_timeout"}
)


def flag(field: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return "--" + {"options": "option"}.get(field, field).replace("_", "-")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. The defaults train deit_tiny (patch 4, 32 px) on Fashion-MNIST."""

    # data
    data_dir: str | None = None  # None: /usr/share/datasets/fashion-mnist
    train_subset: int | None = None  # train on the first N training images
    test_subset: int | None = None
    img_size: int = 32
    augment: bool = True
    workers: int = 0
    # model
    model: str = "deit_tiny_patch16_224"
    patch_size: int | None = 4  # passed to timm where the model takes a patch_size
    depth: int | None = None
    # precision
    precision: str = "gradq"
    backend: str | None = None  # None: gradq_eager on CPU, gradq on CUDA
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    no_iqr: bool = False
    no_gradient_scaling: bool = False
    no_ch_loss: bool = False
    no_adaptive_lr: bool = False
    compile: bool = False  # fp32 / bf16: torch.compile with Inductor
    # low-bit QAT
    weight_bits: int = 8
    activation_bits: int = 8
    lsq: bool = False
    obr: bool = False
    teacher: str | None = None  # a float run's checkpoint.pt
    # optimisation
    optimizer: str = "adamw"
    lr: float | None = None  # None: DEFAULT_LR of the optimizer
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    epochs: int = 10
    batch_size: int = 128  # per process
    seed: int = 0
    # run
    device: str = "auto"
    dist_timeout: float = 1800.0  # seconds a collective may wait under torchrun (torch's default)
    log_every: int = 50
    out: str | None = None  # None: runs/<model>-<precision>-seed<seed>
    resume: bool = False
    stop_after: int | None = None  # end this run after that epoch; --resume continues it

    def __post_init__(self):
        object.__setattr__(self, "options", dict(self.options))
        self._check_choices()
        self._check_numbers()
        self._check_precision_flags()
        GradQConfig.from_options(self.gradq_options() or {})  # raises on a bad --option

    def _check_choices(self) -> None:
        for field, choices in (
            ("precision", PRECISIONS),
            ("optimizer", OPTIMIZERS),
            ("device", DEVICES),
        ):
            if getattr(self, field) not in choices:
                raise ValueError(
                    f"{flag(field)} must be one of {list(choices)}, got {getattr(self, field)!r}"
                )
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {list(BACKENDS)}, got {self.backend!r}")

    def _check_numbers(self) -> None:
        at_least_one = ("img_size", "epochs", "batch_size", "log_every")
        optional_at_least_one = ("train_subset", "test_subset", "patch_size", "depth")
        for field in at_least_one + optional_at_least_one:
            value = getattr(self, field)
            if value is None and field in optional_at_least_one:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag(field)} must be a positive integer, got {value!r}")
        for field in ("workers", "seed"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{flag(field)} must be an integer >= 0, got {value!r}")
        if isinstance(self.dist_timeout, bool) or not (
            isinstance(self.dist_timeout, (int, float)) and self.dist_timeout > 0
        ):
            raise ValueError(f"--dist-timeout must be a positive number, got {self.dist_timeout!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"--warmup-epochs must be from 0 to --epochs ({self.epochs}), "
                f"got {self.warmup_epochs!r}"
            )
        for field in ("weight_bits", "activation_bits"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
                raise ValueError(f"{flag(field)} must be an integer from 2 to 8, got {value!r}")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.epochs:
            raise ValueError(
                f"--stop-after must be from 1 to --epochs ({self.epochs}), got {self.stop_after!r}"
            )

    def _check_precision_flags(self) -> None:
        int8 = self.precision in INT8_PRECISIONS
        if not int8:
            for field in ("backend", "options"):
                if getattr(self, field):
                    raise ValueError(
                        f"{flag(field)} applies to --precision int8-naive or gradq, "
                        f"not {self.precision}"
                    )
        if int8 and self.compile:
            raise ValueError(
                "--compile is for --precision fp32 and bf16: the INT8 precisions always "
                "compile, with --backend"
            )
        for key in ("weight_bits", "activation_bits"):
            if key in self.options:
                raise ValueError(
                    f"--option {key}: give the width with {flag(key)} (LSQ reads it there)"
                )
        low_bits = min(self.weight_bits, self.activation_bits) < 8
        if low_bits and not int8 and not self.lsq:
            raise ValueError(
                f"--weight-bits {self.weight_bits} --activation-bits {self.activation_bits}: "
                f"--precision {self.precision} quantizes nothing; add --lsq (or use an INT8 "
                "precision)"
            )
        if self.obr and not self.lsq:
            raise ValueError("--obr regularizes LSQ quantizers' bins: it needs --lsq")
        if self.teacher is not None and not isinstance(self.teacher, str):
            raise ValueError(f"--teacher must be a path, got {self.teacher!r}")
        for field in COMPONENT_FLAGS:
            if getattr(self, field) and self.precision != "gradq":
                raise ValueError(
                    f"{flag(field)} drops a GradQ component: it applies to --precision gradq, "
                    f"not {self.precision}"
                )

    # What the run does, derived from the fields.

    @property
    def int8(self) -> bool:
        return self.precision in INT8_PRECISIONS

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def uses_ch_loss(self) -> bool:
        """ch_loss: gradq's objective, unless dropped or replaced by distillation."""
        return self.precision == "gradq" and not self.no_ch_loss and self.teacher is None

    def lsq_config(self) -> GradQConfig:
        """What `gradq_fx.qat.attach_lsq` reads: the widths, and the Linears to quantize (those
        the gradq options select; without --option exclude, all but the head)."""
        options = dict(self.gradq_options() or {})
        options.setdefault("exclude", ["head"])
        options.update(weight_bits=self.weight_bits, activation_bits=self.activation_bits)
        return GradQConfig.from_options(options)

    @property
    def uses_adaptive_lr(self) -> bool:
        """gradq's adaptive learning rate: on for gradq unless dropped, or statistics are off."""
        if self.precision != "gradq" or self.no_adaptive_lr:
            return False
        return GradQConfig.from_options(self.gradq_options()).stats

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/{self.model}-{self.precision}-seed{self.seed}")

    def gradq_options(self) -> dict[str, Any] | None:
        """The `torch.compile` options of an INT8 precision (None for fp32 and bf16)."""
        if not self.int8:
            return None
        options = dict(PRECISION_OPTIONS[self.precision])
        for field, option in COMPONENT_FLAGS.items():
            if getattr(self, field) and option is not None:
                options[option[0]] = option[1]
        for key in ("weight_bits", "activation_bits"):
            if getattr(self, key) != 8:
                options[key] = getattr(self, key)
        options.update(self.options)
        return options

    def changes_from(self, other: TrainConfig) -> list[str]:
        """The fields that differ from `other` and would change the computation."""
        return [
            field.name
            for field in dataclasses.fields(self)
            if field.name not in RESUMABLE_CHANGES
            and getattr(self, field.name) != getattr(other, field.name)
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, value: TrainConfig | argparse.Namespace | Mapping[str, Any]) -> TrainConfig:
        """A TrainConfig from itself, parsed command-line arguments, or a dict of fields."""
        if isinstance(value, TrainConfig):
            return value
        if isinstance(value, argparse.Namespace):
            return cls.from_args(value)
        if isinstance(value, Mapping):
            names = {field.name for field in dataclasses.fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ValueError(f"unknown training setting(s) {unknown}; valid: {sorted(names)}")
            return cls(**value)
        raise ValueError(
            f"train() takes a TrainConfig, parsed arguments or a dict, got {type(value).__name__}"
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """From `python -m gradq_fx train`'s arguments (`--option` pairs become `options`)."""
        values = vars(args)
        fields = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
        fields["options"] = dict(values.get("option") or ())
        return cls(**fields)
