"""Precomputed teacher probabilities: built once, looked up by sample index."""

from __future__ import annotations

import pytest
import torch

from gradq_fx.losses import kd_loss
from gradq_fx.qat import TeacherTable


def dataset_and_teacher(samples=23, features=5, classes=3):
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(samples, features, generator=gen)
    teacher = torch.nn.Sequential(torch.nn.Linear(features, classes), torch.nn.Dropout(0.5))
    return inputs, teacher


def shuffled_batches(inputs, batch=4, seed=1):
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(order), batch):
        index = order[start : start + batch]
        yield index, inputs[index]


def test_build_and_lookup_match_a_live_teacher():
    inputs, teacher = dataset_and_teacher()
    teacher.train()
    table = TeacherTable.build(teacher, shuffled_batches(inputs), num_samples=len(inputs))
    assert teacher.training  # mode restored
    assert len(table) == 23 and table.probs.shape == (23, 3)
    teacher.eval()  # the table was built in eval mode (no dropout)
    with torch.no_grad():
        live = teacher(inputs).softmax(dim=1)
    index = torch.tensor([22, 0, 7, 7, 13])
    torch.testing.assert_close(table.lookup(index), live[index])
    # The loss with looked-up rows is the loss with the live teacher's.
    student = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(kd_loss(student, table.lookup(index)), kd_loss(student, live[index]))


def test_build_needs_every_sample():
    inputs, teacher = dataset_and_teacher()
    batches = list(shuffled_batches(inputs))[:-1]
    with pytest.raises(ValueError, match="not seen"):
        TeacherTable.build(teacher, batches, num_samples=len(inputs))


def test_table_rows_must_be_probabilities():
    with pytest.raises(ValueError, match="sum to 1"):
        TeacherTable(torch.full((4, 3), 0.5))
    with pytest.raises(ValueError, match="sum to 1"):
        TeacherTable(torch.tensor([[1.5, -0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        TeacherTable(torch.ones(4))
    table = TeacherTable(torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]]))
    assert table.lookup(torch.tensor([2, 1])).tolist() == [[0.5, 0.5], [1.0, 0.0]]
