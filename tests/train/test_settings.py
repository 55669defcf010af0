"""TrainConfig: each precision's options, and bad input as ValueErrors naming the flag."""

from __future__ import annotations

import argparse

import pytest

from gradq_fx.cli import main
from gradq_fx.train.settings import TrainConfig


def test_precision_options():
    assert TrainConfig(precision="fp32").gradq_options() is None
    assert TrainConfig(precision="bf16").gradq_options() is None
    assert TrainConfig(precision="gradq").gradq_options() == {"stats": True}
    assert TrainConfig(precision="int8-naive").gradq_options() == {
        "gradient_quantizer": "minmax",
        "gradient_scaling": False,
        "stats": False,  # nothing reads them: no adaptive learning rate
    }


def test_component_flags_and_options_merge_in_order():
    config = TrainConfig(
        precision="gradq",
        no_iqr=True,
        no_gradient_scaling=True,
        options={"gradient_bits": 6, "gradient_quantizer": "iqr"},
    )
    # --option applies last: it overrides what --no-iqr set.
    assert config.gradq_options() == {
        "stats": True,
        "gradient_quantizer": "iqr",
        "gradient_scaling": False,
        "gradient_bits": 6,
    }
    assert TrainConfig(precision="gradq").uses_ch_loss
    assert not TrainConfig(precision="gradq", no_ch_loss=True).uses_ch_loss
    assert not TrainConfig(precision="int8-naive").uses_ch_loss


def test_adaptive_lr_is_on_for_gradq_only_and_needs_statistics():
    assert TrainConfig(precision="gradq").uses_adaptive_lr
    dropped = TrainConfig(precision="gradq", no_adaptive_lr=True)
    assert not dropped.uses_adaptive_lr and dropped.gradq_options() == {"stats": False}
    assert not TrainConfig(precision="gradq", options={"stats": False}).uses_adaptive_lr
    assert not TrainConfig(precision="int8-naive").uses_adaptive_lr
    assert not TrainConfig(precision="fp32").uses_adaptive_lr


def test_defaults():
    config = TrainConfig()
    assert (config.model, config.patch_size, config.img_size) == ("deit_tiny_patch16_224", 4, 32)
    assert config.learning_rate == 1e-3
    assert TrainConfig(optimizer="sgd").learning_rate == 0.05
    assert str(config.out_dir) == "runs/deit_tiny_patch16_224-gradq-seed0"


@pytest.mark.parametrize(
    "settings, flag",
    [
        (dict(epochs=-1), "--epochs"),
        (dict(epochs=0), "--epochs"),
        (dict(batch_size=0), "--batch-size"),
        (dict(train_subset=0), "--train-subset"),
        (dict(depth=0), "--depth"),
        (dict(workers=-1), "--workers"),
        (dict(lr=0.0), "--lr"),
        (dict(weight_decay=-0.1), "--weight-decay"),
        (dict(warmup_epochs=11), "--warmup-epochs"),
        (dict(stop_after=11), "--stop-after"),
        (dict(precision="fp16"), "--precision"),
        (dict(optimizer="lamb"), "--optimizer"),
        (dict(device="tpu"), "--device"),
        (dict(backend="inductor"), "--backend"),
        (dict(precision="fp32", backend="gradq"), "--backend"),
        (dict(precision="bf16", options={"attention": "int8"}), "--option"),
        (dict(precision="int8-naive", no_iqr=True), "--no-iqr"),
        (dict(precision="fp32", no_ch_loss=True), "--no-ch-loss"),
        (dict(precision="bf16", no_gradient_scaling=True), "--no-gradient-scaling"),
        (dict(precision="int8-naive", no_adaptive_lr=True), "--no-adaptive-lr"),
        (dict(precision="gradq", compile=True), "--compile"),
        (dict(precision="gradq", options={"gradient_bits": 9}), "gradient_bits"),
        (dict(precision="gradq", options={"colour": "red"}), "colour"),
    ],
)
def test_bad_settings_name_the_flag(settings, flag):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(**settings)


def test_coerce_from_namespace_and_dict():
    parsed = argparse.Namespace(epochs=3, precision="fp32", option=[("x", 1)], unrelated=True)
    with pytest.raises(ValueError, match="--option applies to"):
        TrainConfig.coerce(parsed)
    parsed.option = []
    assert TrainConfig.coerce(parsed) == TrainConfig(epochs=3, precision="fp32")
    assert TrainConfig.coerce({"epochs": 3, "precision": "fp32"}).epochs == 3
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig.coerce({"epoch": 3})


def test_changes_from_ignores_what_does_not_change_the_computation():
    saved = TrainConfig(epochs=3)
    assert saved.changes_from(TrainConfig(epochs=3, workers=2, resume=True, out="x")) == []
    assert saved.changes_from(TrainConfig(epochs=4, lr=0.1)) == ["lr", "epochs"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "-2"], "--epochs must be a positive integer, got -2"),
        (["--precision", "fp32", "--no-iqr"], "--no-iqr drops a GradQ component"),
        (["--precision", "fp32", "--option", "attention=int8"], "--option applies to"),
        (["--option", "attention"], "--option takes key=value"),
        (["--data-dir", "/nonexistent/fashion"], "apt-get install dataset-fashion-mnist"),
        (["--precision", "fp32", "--model", "no_such_model"], "--model: unknown timm model"),
    ],
)
def test_cli_reports_bad_input_as_usage_errors(argv, message, capsys, idx_dir):
    if "--data-dir" not in argv:
        argv = [*argv, "--data-dir", str(idx_dir)]
    with pytest.raises(SystemExit) as exit_:
        main(["train", *argv])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "usage: python -m gradq_fx train" in error and message in error
