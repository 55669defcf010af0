"""Data: the IDX reader, image folders, fitting to the input size, augmentation, errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from PIL import Image

from gradq_fx.train import data
from gradq_fx.train.data import BatchTransform, fit_to_size, load_datasets, read_idx
from tests.train.conftest import idx_bytes, synthetic_images, write_idx, write_idx_dataset

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trips_a_file_written_here(tmp_path, suffix):
    array = torch.randint(0, 256, (5, 3, 4), dtype=torch.uint8)
    path = write_idx(tmp_path / f"images{suffix}", array)
    assert torch.equal(read_idx(path), array)


def test_read_idx_reads_labels_as_one_dimension(tmp_path):
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    assert read_idx(write_idx(tmp_path / "labels", labels)).tolist() == [3, 1, 4, 1, 5]


def corrupt(raw: bytes, where: str) -> bytes:
    if where == "magic":
        return b"\x01" + raw[1:]
    if where == "type code":
        return raw[:2] + b"\x0d" + raw[3:]  # 0x0d: float, not uint8
    if where == "dimension":
        return raw[:4] + (99).to_bytes(4, "big") + raw[8:]
    if where == "payload":
        return raw[:-3]
    return raw[:6]  # truncated header


@pytest.mark.parametrize(
    "where, message",
    [
        ("magic", "not an IDX file"),
        ("type code", "type code 0x0d"),
        ("dimension", "bytes of data"),
        ("payload", "bytes of data"),
        ("truncated", "truncated"),
    ],
)
@pytest.mark.parametrize("compressed", [False, True])
def test_read_idx_rejects_a_bad_header_naming_the_file(tmp_path, where, message, compressed):
    raw = corrupt(idx_bytes(torch.zeros(4, 2, 2, dtype=torch.uint8)), where)
    path = tmp_path / ("bad.gz" if compressed else "bad")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    with pytest.raises(ValueError, match=message) as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_read_idx_rejects_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(idx_bytes(torch.zeros(3, dtype=torch.uint8)))[:-6])
    with pytest.raises(ValueError, match=f"{path}: corrupt gzip"):
        read_idx(path)


def test_fit_to_size_pads_small_images_exactly_and_resizes_others():
    image = torch.randint(1, 256, (1, 28, 28), dtype=torch.uint8)
    padded = fit_to_size(image, 32)
    assert padded.shape == (1, 32, 32)
    assert torch.equal(padded[:, 2:30, 2:30], image)
    assert padded.sum() == image.sum()  # the border is zeros

    wide = torch.full((3, 40, 80), 200, dtype=torch.uint8)
    resized = fit_to_size(wide, 16)  # shorter side to 16, centre crop
    assert resized.shape == (3, 16, 16) and resized.dtype == torch.uint8
    assert torch.all(resized == 200)
    assert fit_to_size(image, 64).shape == (1, 64, 64)  # too small to pad: resized


def test_load_datasets_from_idx_files_with_subsets(tmp_path):
    directory = write_idx_dataset(tmp_path, train=50, test=20, suffix="")
    datasets = load_datasets(directory, img_size=32, train_subset=30, test_subset=7)
    assert (len(datasets.train), len(datasets.test), datasets.num_classes) == (30, 7, 10)
    images, labels = synthetic_images(50, seed=0)
    image, label = datasets.train[13]
    assert image.shape == (1, 32, 32) and label == int(labels[13])
    assert torch.equal(image[0, 2:30, 2:30], images[13])
    assert len(datasets.mean) == len(datasets.std) == 1 and 0 < datasets.mean[0] < 1


def test_load_datasets_rejects_image_and_label_counts_that_differ(tmp_path):
    directory = write_idx_dataset(tmp_path, train=10, test=10)
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", torch.zeros(9, dtype=torch.uint8))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_datasets(directory, img_size=32)


def write_image_folder(root: Path, sizes: dict[str, dict[str, int]]) -> None:
    """root/<split>/<class>/<n>.png with a colour that encodes the class."""
    colours = {"cat": (200, 10, 10), "dog": (10, 200, 10), "owl": (10, 10, 200)}
    for split, counts in sizes.items():
        for name, count in counts.items():
            (root / split / name).mkdir(parents=True)
            for n in range(count):
                Image.new("RGB", (20 + n, 24), colours[name]).save(root / split / name / f"{n}.png")


def test_load_datasets_from_an_image_folder(tmp_path):
    write_image_folder(tmp_path, {"train": {"cat": 3, "dog": 2, "owl": 1}, "val": {"dog": 2}})
    datasets = load_datasets(tmp_path, img_size=16)
    assert datasets.classes == ["cat", "dog", "owl"]
    assert (len(datasets.train), len(datasets.test)) == (6, 2)
    labels = [datasets.train[i][1] for i in range(6)]
    assert labels == [0, 0, 0, 1, 1, 2]
    image, label = datasets.test[1]
    assert image.shape == (3, 16, 16) and label == 1
    assert image[1].float().mean() > 150 and image[0].float().mean() < 50  # green: a dog
    assert len(datasets.mean) == 3


def test_image_folder_with_test_split_and_unknown_classes(tmp_path):
    write_image_folder(tmp_path, {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1}})
    assert len(load_datasets(tmp_path, img_size=16).test) == 1
    (tmp_path / "test" / "owl").mkdir()
    with pytest.raises(ValueError, match=r"classes \['owl'\] that train/ lacks"):
        load_datasets(tmp_path, img_size=16)


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_data_says_how_to_get_it(tmp_path, make):
    directory = tmp_path / "nowhere"
    if make == "empty":
        directory.mkdir()
    with pytest.raises(ValueError) as error:
        load_datasets(directory, img_size=32)
    message = str(error.value)
    assert message.startswith(f"--data-dir: {directory}")
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir DIR" in message and "train-images-idx3-ubyte" in message


def test_default_data_dir_is_debians(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", tmp_path / "absent")
    with pytest.raises(ValueError, match="absent does not exist"):
        load_datasets(None, img_size=32)


def test_batch_transform_augments_reproducibly_and_normalises():
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    transform = BatchTransform(mean=(0.5,), std=(0.25,))
    plain = transform(images)
    assert plain.shape == (8, 3, 16, 16)
    assert torch.allclose(plain[:, 0], (images[:, 0] / 255 - 0.5) / 0.25)
    assert torch.equal(plain[:, 0], plain[:, 2])  # grayscale copied to 3 channels

    first = transform(images, torch.Generator().manual_seed(3))
    again = transform(images, torch.Generator().manual_seed(3))
    other = transform(images, torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first, plain)
    off = BatchTransform(mean=(0.5,), std=(0.25,), augment=False)
    assert torch.equal(off(images, torch.Generator().manual_seed(3)), plain)


def test_random_crop_and_flip_move_pixels_without_changing_them():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) + 1
    cropped = data.random_crop(images, padding=1, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (1,) * 4)
    for b in range(2):
        # Every crop is the image shifted by at most one pixel, zeros coming in at the border.
        windows = [padded[b, :, y : y + 4, x : x + 4] for y in range(3) for x in range(3)]
        assert any(torch.equal(cropped[b], window) for window in windows)
    flipped = data.random_flip(images, torch.Generator().manual_seed(0))
    for b in range(2):
        assert torch.equal(flipped[b], images[b]) or torch.equal(flipped[b], images[b].flip(2))


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_files():
    datasets = load_datasets(None, img_size=32)
    assert (len(datasets.train), len(datasets.test), datasets.num_classes) == (60000, 10000, 10)
    counts = torch.bincount(datasets.test.labels, minlength=10)
    assert counts.tolist() == [1000] * 10  # Fashion-MNIST's test set is balanced
    image, _ = datasets.train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.uint8
    assert 0.2 < datasets.mean[0] < 0.35 and 0.25 < datasets.std[0] < 0.45
