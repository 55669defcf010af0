"""Training runs end to end on small synthetic data: outputs, falling loss, each precision."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from gradq_fx.cli import main
from gradq_fx.config import GradQConfig
from gradq_fx.train import TrainConfig, Trainer, train
from gradq_fx.train.loop import LOG_FIELDS, augmentation_seed
from tests.train.conftest import tiny_settings
from tests.train.test_data import write_image_folder


def read_log(path) -> list[dict[str, float]]:
    with open(path, newline="") as file:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(file)]


@pytest.fixture(scope="module")
def cli_run(idx_dir, tmp_path_factory):
    """Six fp32 epochs through `python -m gradq_fx train`'s main(); the output directory.

    No augmentation: the model learns a fixed set of 160 images, so the loss falls clearly."""
    out = tmp_path_factory.mktemp("cli_run")
    argv = ["train", "--precision", "fp32", "--data-dir", str(idx_dir), "--out", str(out)]
    argv += ["--depth", "1", "--img-size", "16", "--batch-size", "16", "--epochs", "6"]
    argv += ["--train-subset", "160", "--test-subset", "64", "--warmup-epochs", "1"]
    argv += ["--no-augment"]
    assert main(argv) == 0
    return out


def test_cli_run_writes_log_curves_checkpoint_and_result(cli_run):
    rows = read_log(cli_run / "log.csv")
    assert list(rows[0]) == list(LOG_FIELDS)
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["step"] for row in rows] == [10, 20, 30, 40, 50, 60]  # 160 images / batch 16
    assert all(row["seconds"] > 0 and 0 <= row["test_top1"] <= 100 for row in rows)
    assert rows[0]["lr"] == pytest.approx(1e-3)  # the last warm-up step is at the peak

    image = Image.open(cli_run / "curves.png")
    assert image.format == "PNG" and image.width > image.height > 100

    result = json.loads((cli_run / "result.json").read_text())
    assert result["top1"] == pytest.approx(rows[-1]["test_top1"])
    assert result["test_loss"] == pytest.approx(rows[-1]["test_loss"])
    assert (result["epochs"], result["steps"], result["precision"]) == (6, 60, "fp32")
    assert (result["train_images"], result["test_images"]) == (160, 64)

    state = torch.load(cli_run / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["scheduler"]["last_epoch"]) == (6, 60, 60)
    assert state["config"]["precision"] == "fp32" and state["gradq_options"] is None
    assert len(state["history"]) == 6 and len(state["rng"]) == 1
    assert "blocks.0.attn.qkv.weight" in state["model"]


def test_training_loss_falls(cli_run):
    rows = read_log(cli_run / "log.csv")
    assert rows[-1]["train_loss"] < 0.7 * rows[0]["train_loss"]
    assert rows[-1]["test_top1"] > 50  # 10 classes: chance is 10%


def test_gradq_training_loss_falls_and_reports_the_rewrite(idx_dir, tmp_path):
    settings = tiny_settings(idx_dir, tmp_path, precision="gradq", batch_size=16)
    settings.update(train_subset=64, test_subset=32, epochs=3, warmup_epochs=1, augment=False)
    trainer = Trainer(TrainConfig(**settings))
    result = trainer.fit()
    rows = read_log(tmp_path / "log.csv")
    assert rows[-1]["train_loss"] < 0.75 * rows[0]["train_loss"]
    assert result["backend"] == "gradq_eager"  # the CPU default
    # One block: qkv, proj, fc1, fc2, the head, and the patch-embedding convolution.
    assert result["gradq_rewritten_ops"] == 6
    assert result["gradq_options"] == GradQConfig(stats=True).to_options()
    assert TrainConfig(**result["config"]).uses_ch_loss and result["adaptive_lr"]
    # AdaptiveLR scaled each quantized layer's learning rate in the last step, by
    # max(exp(-20 (1 - cosine)), 0.1): a factor in [0.1, 1].
    factors = torch.stack(list(trainer.adaptive.factors.values()))
    assert len(factors) == 6 and torch.all((factors >= 0.1) & (factors <= 1))


def test_image_folder_run_takes_its_classes(tmp_path):
    write_image_folder(
        tmp_path / "data", {"train": {"cat": 4, "dog": 4, "owl": 4}, "val": {"owl": 2}}
    )
    settings = tiny_settings(tmp_path / "data", tmp_path / "out", batch_size=4, epochs=1)
    result = train(settings)
    assert (result["train_images"], result["test_images"]) == (12, 2)
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert state["model"]["head.weight"].shape[0] == 3


def test_bf16_autocast_run(idx_dir, tmp_path):
    settings = tiny_settings(idx_dir, tmp_path, precision="bf16", epochs=1, train_subset=64)
    result = train(settings | {"test_subset": 32})
    assert result["precision"] == "bf16" and 0 <= result["top1"] <= 100


def test_batch_larger_than_the_data_is_a_value_error(idx_dir, tmp_path):
    with pytest.raises(
        ValueError, match="--batch-size: 32 images per step and process, but only 20"
    ):
        train(tiny_settings(idx_dir, tmp_path, train_subset=20))


def test_augmentation_seed_depends_on_seed_epoch_and_rank_only():
    seeds = {augmentation_seed(s, e, r) for s in range(2) for e in range(2) for r in range(2)}
    assert len(seeds) == 8
    assert augmentation_seed(1, 2, 3) == augmentation_seed(1, 2, 3)
