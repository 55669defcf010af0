"""Checkpoints: train 2 epochs, or 1 then resume for 1: the same weights and the same log."""

from __future__ import annotations

import csv

import pytest
import torch

from gradq_fx.train import train
from gradq_fx.train.checkpoint import CHECKPOINT_NAME, load, rng_state, save, set_rng_state
from tests.train.conftest import tiny_settings


def read_log(path) -> list[dict[str, float]]:
    """log.csv's rows without the wall-clock column."""
    with open(path, newline="") as file:
        return [
            {k: float(v) for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)
        ]


def interrupted_and_straight(idx_dir, tmp_path, **overrides) -> tuple:
    """(checkpoint and log of 2 straight epochs, the same of 1 epoch + a resumed one)."""
    settings = tiny_settings(idx_dir, tmp_path / "straight", **overrides)
    straight = train(settings)
    resumed_settings = settings | {"out": str(tmp_path / "resumed")}
    assert train(resumed_settings | {"stop_after": 1}) is None
    assert (
        read_log(tmp_path / "resumed" / "log.csv")
        == read_log(tmp_path / "straight" / "log.csv")[:1]
    )
    torch._dynamo.reset()  # like a new process: the resumed run compiles afresh
    resumed = train(resumed_settings | {"resume": True})
    assert resumed["top1"] == pytest.approx(straight["top1"])
    return tuple(
        (load(tmp_path / name / CHECKPOINT_NAME), read_log(tmp_path / name / "log.csv"))
        for name in ("straight", "resumed")
    )


def assert_same_run(straight, resumed) -> None:
    (state_a, log_a), (state_b, log_b) = straight, resumed
    assert len(log_a) == len(log_b) == 2
    for row_a, row_b in zip(log_a, log_b, strict=True):
        assert row_a == pytest.approx(row_b, rel=1e-5, abs=1e-6)
    assert state_a["model"].keys() == state_b["model"].keys()
    for name, value in state_a["model"].items():
        torch.testing.assert_close(state_b["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert state_a["step"] == state_b["step"] and state_a["epoch"] == state_b["epoch"] == 2
    first, second = (s["optimizer"]["state"] for s in (state_a, state_b))
    for index in first:
        torch.testing.assert_close(second[index]["exp_avg_sq"], first[index]["exp_avg_sq"])


def test_resume_continues_exactly_fp32(idx_dir, tmp_path):
    straight, resumed = interrupted_and_straight(idx_dir, tmp_path, train_subset=96, test_subset=32)
    assert_same_run(straight, resumed)


def test_resume_continues_exactly_gradq(idx_dir, tmp_path):
    straight, resumed = interrupted_and_straight(
        idx_dir, tmp_path, precision="gradq", batch_size=16, train_subset=48, test_subset=16
    )
    assert_same_run(straight, resumed)
    assert straight[0]["gradq_options"] == resumed[0]["gradq_options"]
    assert straight[0]["gradq_options"]["gradient_clipping"] == "iqr"


def test_resume_refuses_other_settings_or_no_checkpoint(idx_dir, tmp_path):
    settings = tiny_settings(idx_dir, tmp_path, train_subset=64, test_subset=32, epochs=1)
    with pytest.raises(ValueError, match=f"--resume: no checkpoint at {tmp_path}"):
        train(settings | {"resume": True})
    train(settings)
    with pytest.raises(ValueError, match=r"--resume: .* other settings: --lr None \(now 0.01\)"):
        train(settings | {"resume": True, "lr": 0.01})
    # Where the run ends or how data are loaded may change.
    assert train(settings | {"resume": True, "workers": 1})["epochs"] == 1


def test_save_is_atomic_and_rng_state_round_trips(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save(path, {"value": torch.arange(3)})
    assert torch.equal(load(path)["value"], torch.arange(3))
    assert not (tmp_path / f"{CHECKPOINT_NAME}.partial").exists()
    state = rng_state(torch.device("cpu"))
    expected = torch.rand(4)
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(4), expected)
