"""`python -m gradq_fx report --model deit_tiny_patch16_224`: what gradq does to a timm model."""

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
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
