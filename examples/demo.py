"""Train deit_tiny_patch16_224 in INT8 with gradq for a few steps, then print the report.

    python examples/demo.py [--steps 5] [--img-size 32] [--batch-size 8] [--attention int8]

Real data is not needed here: a fixed random batch with random labels, which the model can
memorise, so the loss visibly falls. The report lists every GEMM gradq rewrote.
"""

from __future__ import annotations

import argparse
import sys
import time

import timm
import torch

import gradq_fx


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--attention", choices=("float", "int8"), default="float")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=10, img_size=args.img_size)
    config = gradq_fx.GradQConfig.from_options({"attention": args.attention})
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch_size,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiled = gradq_fx.compile(model, config)

    print(f"{args.model} at {args.img_size}px, batch {args.batch_size}, gradq INT8 training")
    print("step 1 compiles the forward and backward graphs (about a minute on 2 CPU cores) ...")
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.1f} s)")
        sys.stdout.flush()

    # The report of each graph the compile made: what it rewrote, and what stays float.
    for graph_report in gradq_fx.compiled_reports():
        print()
        print(graph_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
