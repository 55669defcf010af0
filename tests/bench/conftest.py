"""What the `bench` tests share: the CPU device, the flags of a tiny model run, a Summary."""

from __future__ import annotations

import torch

from gradq_fx.bench.timing import Summary

CPU = torch.device("cpu")
TINY_MODEL = ["--device", "cpu", "--model", "test_vit", "--img-size", "16", "--patch-size", "4"]
TINY_MODEL += ["--depth", "1", "--iters", "2", "--warmup", "1"]


def summary(median: float) -> Summary:
    """A Summary of three made-up samples around `median`."""
    return Summary(median, median - 1, median + 1, median - 2, median + 3, 3)
