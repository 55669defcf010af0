"""Low-bit QAT on Fashion-MNIST: W4A4, W3A3 and W2A2, with the Quantization Variation parts.

    python examples/qat_ablation.py run [--models test_vit] [--bits 4,3,2] [--seeds 0,1,2] ... \
        [-- TRAIN FLAGS]      (e.g. -- --depth 2 --no-augment --lr 0.003)
    python examples/qat_ablation.py table [--root runs/qat]

`run` first trains one fp32 teacher per (model, seed) into ROOT/<model>/teacher/seed<seed>/
with the students' protocol (`--teacher CHECKPOINT` distils every run from that float
checkpoint of `python -m gradq_fx train` instead, e.g. one trained longer), then every (model,
bits, setting, seed) with `python -m gradq_fx train`, one process per run, into
ROOT/<model>/<setting>-w<b>a<b>/seed<seed>/. Settings: min-max fake quantization (`minmax`),
LSQ (`lsq`), LSQ + bin regularizer (`lsq+obr`), and LSQ + regularizer + distillation from the
teacher (`lsq+obr+kd`), all at --precision gradq (INT8 backward). A run whose result.json
exists is skipped, so an interrupted sweep continues where it stopped.
`table` prints mean and standard deviation of test top-1 per model and setting (the fp32
teachers as `teacher`), with the protocol they used (examples/ablation.py's table).

The whole sweep is 3 x 4 x 3 runs plus 3 teachers per model. The tables in docs/results.md hold
the part run on a 2-core CPU (W4A4 with every setting, W3A3 and W2A2 without distillation;
commands there; runs in examples/results/qat/, and with a stronger teacher in
examples/results/qat-strong/).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

# setting -> the train command's flags (besides the widths)
SETTINGS = {
    "minmax": [],
    "lsq": ["--lsq"],
    "lsq+obr": ["--lsq", "--obr"],
    "lsq+obr+kd": ["--lsq", "--obr", "--teacher", "{teacher}"],
}
TEACHER = "teacher"


def _sibling(name: str):
    """examples/<name>.py as a module (the table code is examples/ablation.py's)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation = _sibling("ablation")


def setting_name(setting: str, bits: int) -> str:
    return f"{setting}-w{bits}a{bits}"


def run_dir(root: Path, model: str, name: str, seed: int) -> Path:
    return root / model / name / f"seed{seed}"


def _train(out: Path, model: str, seed: int, args: argparse.Namespace, flags: list[str]) -> None:
    if (out / "result.json").exists():
        return
    command = ablation.train_command(out, model, seed, args, flags)
    print(f"{model} {out.parent.name} seed {seed}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def run(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"--settings: unknown {unknown}; valid: {', '.join(SETTINGS)}")
    bad_bits = [b for b in args.bits if not 2 <= b <= 8]
    if bad_bits:
        raise ValueError(f"--bits: widths are 2 to 8, got {bad_bits}")
    if args.teacher is not None and not args.teacher.is_file():
        raise ValueError(f"--teacher: no checkpoint at {args.teacher}")
    distils = any("{teacher}" in " ".join(SETTINGS[s]) for s in args.settings)
    for seed in args.seeds:  # whole seeds first: a partial sweep holds every setting
        for model in args.models:
            teacher = args.teacher
            if teacher is None:
                teacher = run_dir(args.root, model, TEACHER, seed) / "checkpoint.pt"
                if distils:
                    _train(teacher.parent, model, seed, args, ["--precision", "fp32"])
            for bits in args.bits:
                for setting in args.settings:
                    flags = [f.format(teacher=teacher) for f in SETTINGS[setting]]
                    flags += ["--precision", "gradq", "--backend", args.backend]
                    flags += ["--weight-bits", str(bits), "--activation-bits", str(bits)]
                    out = run_dir(args.root, model, setting_name(setting, bits), seed)
                    _train(out, model, seed, args, flags)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train the missing runs")
    run_parser.add_argument("--models", type=ablation._csv(str), default=["test_vit"])
    run_parser.add_argument("--bits", type=ablation._csv(int), default=[4, 3, 2])
    run_parser.add_argument("--settings", type=ablation._csv(str), default=list(SETTINGS))
    run_parser.add_argument(
        "--teacher",
        type=Path,
        metavar="CHECKPOINT",
        help="distil from this float checkpoint.pt instead of a teacher per seed",
    )
    ablation.add_protocol_arguments(run_parser)
    for sub in (run_parser, commands.add_parser("table", help="print the results table")):
        sub.add_argument("--root", type=Path, default=Path("runs/qat"))
    args = ablation.parse(parser, argv)
    try:
        return run(args) if args.command == "run" else ablation.table(args)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
