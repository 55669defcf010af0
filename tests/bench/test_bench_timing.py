"""`gradq_fx.bench.timing`: the statistics of the samples."""

from __future__ import annotations

import pytest
import torch

from gradq_fx.bench.timing import Summary


def test_summary_matches_torch_quantile():
    samples = torch.rand(17, generator=torch.Generator().manual_seed(0)) * 10
    summary = Summary.of(samples.tolist())
    q1, median, q3 = torch.quantile(samples.double(), torch.tensor([0.25, 0.5, 0.75]).double())
    assert summary.median == pytest.approx(median.item())
    assert summary.q1 == pytest.approx(q1.item())
    assert summary.q3 == pytest.approx(q3.item())
    assert (summary.min, summary.max) == (samples.min().item(), samples.max().item())
    assert summary.count == 17


def test_summary_of_one_sample_and_of_none():
    assert Summary.of([2.5]) == Summary(2.5, 2.5, 2.5, 2.5, 2.5, 1)
    with pytest.raises(ValueError, match="no samples"):
        Summary.of([])
