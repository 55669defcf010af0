"""Low-bit QAT in the train command: --lsq, --obr, --teacher, and checkpoints of quantizers."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from gradq_fx import qat
from gradq_fx.cli import main
from gradq_fx.train import TrainConfig, Trainer, train
from gradq_fx.train.checkpoint import CHECKPOINT_NAME, load
from gradq_fx.train.loop import QAT_LOG_FIELDS
from tests.train.conftest import tiny_settings
from tests.train.test_checkpoint import assert_same_run, interrupted_and_straight


def read_log(path) -> list[dict[str, float]]:
    with open(path, newline="") as file:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(file)]


def qat_settings(idx_dir, out, **overrides) -> dict:
    """Four epochs of 64 unaugmented images at W4A4 with LSQ: the loss falls clearly."""
    settings = tiny_settings(idx_dir, out, batch_size=16, train_subset=64, test_subset=32)
    settings.update(epochs=4, warmup_epochs=1, augment=False, lsq=True)
    settings.update(weight_bits=4, activation_bits=4)
    settings.update(overrides)
    return settings


def test_gradq_lsq_obr_run_trains_logs_oscillation_and_saves_quantizers(idx_dir, tmp_path):
    trainer = Trainer(TrainConfig(**qat_settings(idx_dir, tmp_path, precision="gradq", obr=True)))
    result = trainer.fit()
    rows = read_log(tmp_path / "log.csv")
    assert list(rows[0]) == list(QAT_LOG_FIELDS)
    assert rows[-1]["train_loss"] < 0.75 * rows[0]["train_loss"]
    # A fraction of codes per step: in [0, 1], and some codes do move while training.
    assert all(0 <= row["oscillation"] <= 1 for row in rows)
    assert max(row["oscillation"] for row in rows) > 0
    # The head is left out by default; the block's four Linears carry 4-bit quantizers.
    layers = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert result["lsq_bits"] == {name: [4, 4] for name in layers}
    # At the last step lambda is near its peak 0.01, and the objective adds lambda times
    # the bin regularizer of all six quantized weights (q, k, v blocks, proj, fc1, fc2).
    x = torch.randn(4, 3, 16, 16)
    logits = trainer.model(x)
    y = torch.zeros(4, dtype=torch.long)
    extra = trainer._objective(logits, x, y) - trainer.loss_fn(logits, y)
    weights = qat.quantized_weights(trainer.model)
    assert len(weights) == 6
    expected = sum(qat.bin_regularizer(w, q.scale, q.bits) for _, w, q in weights)
    factor = qat.obr_lambda(trainer.step, 16)
    assert 0.009 < factor <= 0.01
    torch.testing.assert_close(extra, factor * expected, rtol=1e-4, atol=1e-7)

    state = load(tmp_path / CHECKPOINT_NAME)
    model = state["model"]
    # Step sizes (and fc2's input offset) are saved with the model, and they were learnt:
    # they differ from what a fresh attach would fit to the final weights only by training.
    for key in (
        "blocks.0.mlp.fc1.weight_quantizer.scale",
        "blocks.0.mlp.fc1.input_quantizer.scale",
        "blocks.0.mlp.fc2.input_quantizer.offset",
        "blocks.0.attn.qkv.qkv_quantizers.weight.2.scale",
        "blocks.0.attn.qkv.qkv_quantizers.activation.0.scale",
    ):
        assert key in model and bool(torch.isfinite(model[key]).all()), key
    assert model["blocks.0.mlp.fc2.input_quantizer.initialised"]
    assert state["lsq_bits"] == {name: (4, 4) for name in layers}
    # The optimiser saw the quantizer parameters: AdamW state exists for each of them.
    names = [n for n, _ in trainer.model.named_parameters()]
    index = names.index("blocks.0.mlp.fc2.input_quantizer.offset")
    assert state["optimizer"]["state"][index]["step"] == 16


def test_lsq_resume_continues_exactly_and_refuses_other_bits(idx_dir, tmp_path):
    """fp32 with LSQ and OBR (eager: quick): 2 epochs straight, or 1 + a resumed 1."""
    straight, resumed = interrupted_and_straight(
        idx_dir,
        tmp_path,
        batch_size=16,
        train_subset=48,
        test_subset=16,
        lsq=True,
        obr=True,
        weight_bits=3,
        activation_bits=3,
        warmup_epochs=0,
    )
    assert_same_run(straight, resumed)
    scale = "blocks.0.attn.qkv.qkv_quantizers.weight.1.scale"
    assert torch.equal(straight[0]["model"][scale], resumed[0]["model"][scale])
    # Oscillation is logged identically: the trackers' last codes are checkpointed.
    assert straight[1][1]["oscillation"] == pytest.approx(resumed[1][1]["oscillation"])

    settings = tiny_settings(idx_dir, tmp_path / "resumed", batch_size=16, train_subset=48)
    settings.update(test_subset=16, lsq=True, obr=True, activation_bits=3, warmup_epochs=0)
    with pytest.raises(ValueError, match=r"--resume: .*--weight-bits 3 \(now 4\)"):
        train(settings | {"weight_bits": 4, "resume": True})


def test_resume_of_a_checkpoint_with_other_quantizer_widths_is_a_value_error(idx_dir, tmp_path):
    """The widths saved with the quantizers are checked too (a checkpoint edited, or written
    by another version, whose settings would otherwise pass)."""
    settings = qat_settings(idx_dir, tmp_path, epochs=1)
    train(settings)
    path = tmp_path / CHECKPOINT_NAME
    state = load(path)
    state["lsq_bits"]["blocks.0.mlp.fc1"] = (2, 4)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"--resume: .*LSQ quantizers of .*\(2, 4\)"):
        train(settings | {"resume": True})


def test_teacher_distillation_through_the_command(idx_dir, tmp_path):
    """A float teacher from this command, then a W3A3 LSQ student distilled from it."""
    common = ["--data-dir", str(idx_dir), "--depth", "1", "--img-size", "16"]
    common += ["--batch-size", "16", "--train-subset", "64", "--test-subset", "32"]
    common += ["--no-augment", "--warmup-epochs", "1", "--log-every", "1000"]
    teacher = tmp_path / "teacher"
    argv = ["train", "--precision", "fp32", "--epochs", "4", "--out", str(teacher)]
    assert main(argv + common) == 0
    student = tmp_path / "student"
    argv = ["train", "--precision", "fp32", "--epochs", "4", "--out", str(student)] + common
    argv += ["--lsq", "--weight-bits", "3", "--activation-bits", "3"]
    argv += ["--teacher", str(teacher / CHECKPOINT_NAME)]
    assert main(argv) == 0
    rows = read_log(student / "log.csv")
    assert rows[-1]["train_loss"] < 0.75 * rows[0]["train_loss"]
    # The logged objective is the soft cross-entropy against the teacher: at least the
    # teacher's entropy, which a fresh student cannot beat; finite and positive.
    assert all(math.isfinite(row["train_loss"]) and row["train_loss"] > 0 for row in rows)


def test_bad_qat_settings_are_value_errors(idx_dir, tmp_path):
    base = tiny_settings(idx_dir, tmp_path)
    with pytest.raises(ValueError, match="--weight-bits must be an integer from 2 to 8"):
        TrainConfig(**base, weight_bits=9)
    with pytest.raises(ValueError, match="--precision fp32 quantizes nothing; add --lsq"):
        TrainConfig(**base, activation_bits=4)
    with pytest.raises(ValueError, match="--obr .* needs --lsq"):
        TrainConfig(**base | {"precision": "gradq"}, obr=True)
    with pytest.raises(ValueError, match="--option weight_bits: give the width with"):
        TrainConfig(**base | {"precision": "gradq", "options": {"weight_bits": 4}})
    with pytest.raises(ValueError, match=f"--teacher: no checkpoint at {tmp_path}"):
        Trainer(TrainConfig(**base, teacher=str(tmp_path / "missing.pt")))
