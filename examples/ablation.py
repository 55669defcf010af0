"""GradQ-ViT's ablation on Fashion-MNIST: float, naive INT8, gradq, and gradq minus each part.

    python examples/ablation.py run [--models test_vit,mobilevit_xxs] [--seeds 0,1,2] ... \
        [-- TRAIN FLAGS]      (e.g. -- --depth 2 --no-augment --lr 0.003 --warmup-epochs 0.3)
    python examples/ablation.py table [--root runs/ablation]

`run` trains every (model, setting, seed) with `python -m gradq_fx train`, one process per
run, into ROOT/<model>/<setting>/seed<seed>/. A run whose result.json exists is skipped, so an
interrupted sweep continues where it stopped. Seeds go in the outer loop: a partial sweep
holds whole seeds of every setting. `table` prints the mean and standard deviation of test
top-1 per model and setting from whatever runs have finished, with the protocol they used.

The protocol defaults are small; on a GPU pass larger ones. The tables in docs/results.md came
from this script on a 2-core CPU (their commands are printed there; the runs' result.json and
log.csv files are in examples/results/ablation/, which `table --root` reads like any other
root). There the IQR gradient clipping made a gradq epoch about 4-5x slower than an fp32 one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from tabulate import tabulate

# setting -> the train command's precision flags
SETTINGS = {
    "fp32": ["--precision", "fp32"],
    "int8-naive": ["--precision", "int8-naive"],
    "gradq": ["--precision", "gradq"],
    "gradq -iqr": ["--precision", "gradq", "--no-iqr"],
    "gradq -scaling": ["--precision", "gradq", "--no-gradient-scaling"],
    "gradq -ch-loss": ["--precision", "gradq", "--no-ch-loss"],
    "gradq -adaptive-lr": ["--precision", "gradq", "--no-adaptive-lr"],
}
# Protocol flags recorded with the table; they must be equal across the runs of a row.
PROTOCOL = (
    "train_subset", "test_subset", "img_size", "patch_size", "depth", "augment", "epochs",
    "batch_size", "lr", "warmup_epochs", "backend", "options",
)  # fmt: skip


def _csv(kind):
    def parse(text: str) -> list:
        values = [kind(v) for v in text.split(",") if v]
        if not values:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return values

    return parse


def run_dir(root: Path, model: str, setting: str, seed: int) -> Path:
    return root / model / setting.replace(" ", "") / f"seed{seed}"


def train_command(
    out: Path, model: str, seed: int, args: argparse.Namespace, flags: list[str]
) -> list[str]:
    """`python -m gradq_fx train` for one run of the protocol in `args`, with `flags` and then
    the user's TRAIN FLAGS."""
    return [
        sys.executable, "-m", "gradq_fx", "train", "--model", model, "--seed", str(seed),
        "--epochs", str(args.epochs), "--train-subset", str(args.train_subset),
        "--test-subset", str(args.test_subset), "--img-size", str(args.img_size),
        "--patch-size", str(args.patch_size), "--batch-size", str(args.batch_size),
        "--log-every", "1000", "--out", str(out), *flags, *args.train_flags,
    ]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"--settings: unknown {unknown}; valid: {', '.join(SETTINGS)}")
    jobs = [(s, m, k) for s in args.seeds for m in args.models for k in args.settings]
    for index, (seed, model, setting) in enumerate(jobs, 1):
        out = run_dir(args.root, model, setting, seed)
        if (out / "result.json").exists():
            continue
        flags = SETTINGS[setting] + ([] if setting == "fp32" else ["--backend", args.backend])
        command = train_command(out, model, seed, args, flags)
        print(f"[{index}/{len(jobs)}] {model} {setting} seed {seed}", file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
    return 0


def collect(root: Path) -> dict[tuple[str, str], list[dict]]:
    results: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(root.glob("*/*/seed*/result.json")):
        result = json.loads(path.read_text())
        model, setting = path.parts[-4], path.parts[-3]
        results.setdefault((model, setting), []).append(result)
    return results


def _hashable(value):
    """A protocol value as a set member: a dict (--option's) as its sorted items."""
    return tuple(sorted(value.items())) if isinstance(value, dict) else value


def table(args: argparse.Namespace) -> int:
    results = collect(args.root)
    if not results:
        raise ValueError(f"--root: no finished runs under {args.root}")
    names = {name.replace(" ", ""): name for name in SETTINGS}
    rows = []
    for (model, setting), runs in results.items():
        top1 = [r["top1"] for r in runs]
        protocols = {tuple(_hashable(r["config"].get(key)) for key in PROTOCOL) for r in runs}
        if len(protocols) != 1:
            raise ValueError(f"{model} {setting}: runs with different protocols {protocols}")
        spread = statistics.stdev(top1) if len(top1) > 1 else float("nan")
        rows.append(
            (model, names.get(setting, setting), len(top1), statistics.mean(top1), spread,
             ", ".join(f"{t:.2f}" for t in top1), dict(zip(PROTOCOL, protocols.pop(), strict=True)))
        )  # fmt: skip
    order = list(SETTINGS)
    rows.sort(key=lambda r: (r[0], order.index(r[1]) if r[1] in order else len(order)))
    header = ("model", "setting", "seeds", "top-1 mean", "std", "runs")
    print(tabulate([r[:6] for r in rows], header, tablefmt="github", floatfmt=".2f"))
    for model in sorted({r[0] for r in rows}):
        print(f"\n{model} protocol: {next(r[6] for r in rows if r[0] == model)}")
    return 0


def add_protocol_arguments(run_parser: argparse.ArgumentParser) -> None:
    """The `run` arguments every sweep shares: seeds and the training protocol."""
    run_parser.add_argument("--seeds", type=_csv(int), default=[0, 1, 2])
    run_parser.add_argument("--epochs", type=int, default=3)
    run_parser.add_argument("--train-subset", type=int, default=6000)
    run_parser.add_argument("--test-subset", type=int, default=2000)
    run_parser.add_argument("--img-size", type=int, default=32)
    run_parser.add_argument("--patch-size", type=int, default=4)
    run_parser.add_argument("--batch-size", type=int, default=128)
    run_parser.add_argument("--backend", choices=("gradq", "gradq_eager"), default="gradq")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv up to `--`; what follows goes to every run's train command (train_flags)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.train_flags = argv[split + 1 :]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train the missing runs")
    run_parser.add_argument("--models", type=_csv(str), default=["test_vit", "mobilevit_xxs"])
    run_parser.add_argument("--settings", type=_csv(str), default=list(SETTINGS))
    add_protocol_arguments(run_parser)
    for sub in (run_parser, commands.add_parser("table", help="print the results table")):
        sub.add_argument("--root", type=Path, default=Path("runs/ablation"))
    args = parse(parser, argv)
    try:
        return run(args) if args.command == "run" else table(args)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
