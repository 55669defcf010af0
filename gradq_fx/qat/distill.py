"""Precomputed teacher probabilities, so a distilled run need not run its teacher every step.

The Quantization Variation paper precomputes its (multi-crop) teacher labels once; gradq keeps
one row of class probabilities per training sample, looked up by the sample's index in the
dataset. The loss itself is `gradq_fx.losses.kd_loss`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# Rows of a table must sum to 1 within this (float32 softmax rows are off by ~1e-7 * C).
_ROW_SUM_TOLERANCE = 1e-3


class TeacherTable:
    """Teacher probabilities [N, C] for the N samples of a dataset, indexed by sample index."""

    def __init__(self, probs: torch.Tensor):
        if probs.dim() != 2 or probs.shape[0] < 1 or probs.shape[1] < 2:
            raise ValueError(f"teacher probabilities are [N, C], got {tuple(probs.shape)}")
        probs = probs.detach().float()
        if bool((probs < 0).any()) or not torch.allclose(
            probs.sum(dim=1), torch.ones(probs.shape[0]), atol=_ROW_SUM_TOLERANCE, rtol=0
        ):
            raise ValueError("teacher probabilities must be non-negative rows that sum to 1")
        self.probs = probs

    def __len__(self) -> int:
        return self.probs.shape[0]

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """The rows of the samples `index` ([B] integers), on index's device: [B, C]."""
        return self.probs[index.to(self.probs.device)].to(index.device)

    def to(self, device: torch.device | str) -> TeacherTable:
        self.probs = self.probs.to(device)
        return self

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        teacher: nn.Module,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        num_samples: int,
    ) -> TeacherTable:
        """Run `teacher` (in eval mode) once over (sample indices [B], inputs) batches.

        Every sample index in [0, num_samples) must be covered; the teacher's softmax rows are
        kept in float32 (60000 x 10 for Fashion-MNIST is 2.4 MB).
        """
        was_training = teacher.training
        teacher.eval()
        rows: torch.Tensor | None = None
        seen = torch.zeros(num_samples, dtype=torch.bool)
        try:
            for index, inputs in batches:
                probs = teacher(inputs).float().softmax(dim=1).cpu()
                if rows is None:
                    rows = torch.zeros(num_samples, probs.shape[1])
                rows[index.cpu()] = probs
                seen[index.cpu()] = True
        finally:
            teacher.train(was_training)
        if rows is None or not bool(seen.all()):
            missing = int((~seen).sum())
            raise ValueError(f"TeacherTable.build: {missing} of {num_samples} samples not seen")
        return cls(rows)
