"""`python -m gradq_fx report`: what gradq does to a timm model; `python -m gradq_fx train`:
train one (fp32, bf16, or INT8 with gradq) on Fashion-MNIST or your own image folders."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def parse_option(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, value): integers, true/false, comma lists for include/exclude."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option takes key=value, got {text!r}")
    if key in ("include", "exclude"):
        return key, tuple(p for p in value.split(",") if p)
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    if value.lstrip("-").isdigit():
        return key, int(value)
    return key, value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="deit_tiny_patch16_224", help="a timm model name")
    parser.add_argument("--img-size", type=int, default=None, help="input size (model default)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        type=parse_option,
        metavar="KEY=VALUE",
        help="a gradq option, e.g. attention=int8 or exclude=head,patch_embed (repeatable)",
    )


def build_model(name: str, img_size: int | None, num_classes: int):
    """A freshly initialised timm model (no pretrained weights) and its input size."""
    import timm

    if name not in timm.list_models():
        raise ValueError(f"--model: unknown timm model {name!r} (see timm.list_models())")
    kwargs = {"img_size": img_size} if img_size is not None else {}
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    size = img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model, size


def report_command(args: argparse.Namespace) -> int:
    import torch

    from gradq_fx.report import report

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    options = dict(args.option)
    model, size = build_model(args.model, args.img_size, args.num_classes)
    model.train(not args.inference)
    x = torch.randn(args.batch_size, 3, size, size)
    print(f"tracing {args.model} at {size}px, batch {args.batch_size} ...", file=sys.stderr)
    result = report(model, x, options, training=not args.inference)
    print(result.to_json() if args.format == "json" else result.to_text())
    return 0


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `train`, one per TrainConfig field; defaults come from TrainConfig."""
    from gradq_fx.train.schedule import OPTIMIZERS
    from gradq_fx.train.settings import BACKENDS, DEVICES, PRECISIONS, TrainConfig

    d = TrainConfig()
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-dir",
        default=d.data_dir,
        help="Fashion-MNIST's IDX files (gzipped or not), or an ImageFolder directory with "
        "train/ and val/ or test/ (default: /usr/share/datasets/fashion-mnist, from "
        "`apt-get install dataset-fashion-mnist`)",
    )
    data.add_argument("--train-subset", type=int, metavar="N", help="first N training images")
    data.add_argument("--test-subset", type=int, metavar="N", help="first N test images")
    data.add_argument("--img-size", type=int, default=d.img_size, help="model input size (px)")
    data.add_argument(
        "--no-augment", dest="augment", action="store_false", help="no random crops and flips"
    )
    data.add_argument("--workers", type=int, default=d.workers, help="data-loading processes")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=d.model, help="a timm model name (trained from scratch)")
    model.add_argument(
        "--patch-size",
        type=int,
        default=d.patch_size,
        help="timm's patch_size, where the model takes one (default %(default)s)",
    )
    model.add_argument("--depth", type=int, help="number of blocks (timm's depth)")

    precision = parser.add_argument_group("precision")
    precision.add_argument("--precision", choices=PRECISIONS, default=d.precision)
    precision.add_argument(
        "--backend",
        choices=BACKENDS,
        help="for the INT8 precisions (default: gradq_eager on CPU, gradq on CUDA)",
    )
    precision.add_argument(
        "--option",
        action="append",
        default=[],
        type=parse_option,
        metavar="KEY=VALUE",
        help="a gradq option over the precision's, e.g. gradient_bits=6 (repeatable)",
    )
    precision.add_argument("--no-iqr", action="store_true", help="gradq: minmax gradient clipping")
    precision.add_argument(
        "--no-gradient-scaling", action="store_true", help="gradq: no gradient scaling"
    )
    precision.add_argument("--no-ch-loss", action="store_true", help="gradq: plain cross-entropy")
    precision.add_argument(
        "--no-adaptive-lr",
        action="store_true",
        help="gradq: one learning rate for all layers (and no gradient statistics)",
    )
    precision.add_argument(
        "--compile", action="store_true", help="fp32/bf16: torch.compile with Inductor"
    )

    qat = parser.add_argument_group("low-bit QAT (Quantization Variation)")
    qat.add_argument(
        "--weight-bits",
        type=int,
        default=d.weight_bits,
        metavar="B",
        help="forward GEMM weight width, 2 to 8 (below 8: fake quantization; default 8)",
    )
    qat.add_argument(
        "--activation-bits",
        type=int,
        default=d.activation_bits,
        metavar="B",
        help="forward GEMM input width, 2 to 8 (default 8)",
    )
    qat.add_argument(
        "--lsq",
        action="store_true",
        help="learnable LSQ step sizes at those widths on the Linears (the head stays 8-bit)",
    )
    qat.add_argument(
        "--obr", action="store_true", help="add the oscillation-aware bin regularizer (--lsq)"
    )
    qat.add_argument(
        "--teacher",
        metavar="CHECKPOINT",
        help="distil (soft cross-entropy) from a float run's checkpoint.pt of this command",
    )

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    optimisation.add_argument(
        "--lr", type=float, help="peak learning rate (default: 1e-3 for adamw, 0.05 for sgd)"
    )
    optimisation.add_argument("--weight-decay", type=float, default=d.weight_decay)
    optimisation.add_argument(
        "--warmup-epochs",
        type=float,
        default=d.warmup_epochs,
        help="linear warm-up, then cosine decay to 0 (both per step)",
    )
    optimisation.add_argument("--epochs", type=int, default=d.epochs)
    optimisation.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    optimisation.add_argument(
        "--seed", type=int, default=d.seed, help="weights, data order, augmentation"
    )

    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=DEVICES, default=d.device)
    run.add_argument(
        "--dist-timeout",
        type=float,
        default=d.dist_timeout,
        metavar="SECONDS",
        help="under torchrun: how long a collective waits for the other processes before it "
        "fails with an error",
    )
    run.add_argument(
        "--log-every", type=int, default=d.log_every, metavar="N", help="progress every N steps"
    )
    run.add_argument(
        "--out",
        default=d.out,
        metavar="DIR",
        help="output directory (default: runs/<model>-<precision>-seed<seed>)",
    )
    run.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    run.add_argument(
        "--stop-after",
        type=int,
        metavar="EPOCH",
        help="end this run after that epoch (the schedule still spans --epochs)",
    )


def train_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Set up the run (bad settings or missing data: a usage error), then train."""
    from gradq_fx.train import TrainConfig, Trainer

    try:
        trainer = Trainer(TrainConfig.from_args(args))
    except ValueError as error:
        parser.error(str(error))
    trainer.fit()
    return 0


def bench_command(args: argparse.Namespace) -> int:
    """Run `bench` (step or --kernels mode); bad settings raise ValueError (a usage error)."""
    import shlex

    from gradq_fx.bench import BenchConfig, run

    return run(BenchConfig.from_args(args), command="python -m gradq_fx " + shlex.join(args.argv))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradq_fx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    report_parser = commands.add_parser("report", help="print the rewritten GEMMs of a model")
    _add_model_arguments(report_parser)
    report_parser.add_argument("--format", choices=("text", "json"), default="text")
    report_parser.add_argument(
        "--inference", action="store_true", help="report the inference graph (forward only)"
    )
    report_parser.set_defaults(handler=report_command)
    train_parser = commands.add_parser(
        "train", help="train a timm model on Fashion-MNIST (fp32, bf16, int8-naive, gradq)"
    )
    _add_train_arguments(train_parser)
    bench_parser = commands.add_parser(
        "bench",
        help="time a training step in fp32, bf16, bf16 + Inductor and gradq (or, with "
        "--kernels, the model's GEMMs alone)",
    )
    from gradq_fx import bench

    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(
        handler=bench_command, argv=list(sys.argv[1:] if argv is None else argv)
    )
    args = parser.parse_args(argv)
    if args.command == "train":
        # Only setup errors are usage errors; training itself raises normally.
        return train_command(args, train_parser)
    try:
        return args.handler(args)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
