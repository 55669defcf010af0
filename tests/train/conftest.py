"""Small data sets written by the tests themselves, and tiny training settings.

The synthetic images are easy to learn (`synthetic_images`); labels cycle through the classes.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

NUM_CLASSES = 10


def idx_bytes(array: torch.Tensor) -> bytes:
    """The IDX encoding of a uint8 tensor: magic (0, 0, 0x08, ndim), big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.dim()])
    header += b"".join(size.to_bytes(4, "big") for size in array.shape)
    return header + bytes(array.flatten().tolist())


def write_idx(path: Path, array: torch.Tensor) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def synthetic_images(count: int, seed: int, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [count, size, size] and labels [count] of NUM_CLASSES easy classes.

    Like Fashion-MNIST, an object on a black background: class k is a centred bar, horizontal
    for k < 5 and vertical otherwise, at brightness (k % 5 + 1) / 6, plus faint noise. Random
    crops (zero padding: more background) and flips keep a class recognisable.
    """
    labels = torch.arange(count) % NUM_CLASSES
    bar = torch.zeros(size, size)
    bar[size * 3 // 8 : size * 5 // 8, size // 5 : size - size // 5] = 1
    shapes = torch.stack([bar, bar.T])[labels // 5]
    brightness = ((labels % 5 + 1) / 6).float()[:, None, None]
    noise = torch.rand(count, size, size, generator=torch.Generator().manual_seed(seed))
    images = (brightness * shapes + 0.1 * noise).clamp(max=1) * 255
    return images.round().to(torch.uint8), labels.to(torch.uint8)


def write_idx_dataset(
    directory: Path, train: int, test: int, suffix: str = ".gz", size: int = 28
) -> Path:
    """Fashion-MNIST's four files, with synthetic images, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, count, seed in (("train", train, 0), ("t10k", test, 1)):
        images, labels = synthetic_images(count, seed, size)
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return directory


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> Path:
    """A synthetic Fashion-MNIST directory: 320 training and 100 test images of 16 px, gzipped
    (16 px: the tiny runs' input size, so nothing is resized)."""
    return write_idx_dataset(tmp_path_factory.mktemp("fashion"), train=320, test=100, size=16)


def tiny_settings(data_dir: Path, out: Path, **overrides) -> dict:
    """A run that trains in seconds: one block, 16 px (patch 4: 16 tokens), batch 32."""
    settings = dict(
        data_dir=str(data_dir),
        out=str(out),
        depth=1,
        img_size=16,
        batch_size=32,
        epochs=2,
        warmup_epochs=0.5,
        log_every=1000,
        precision="fp32",
    )
    settings.update(overrides)
    return settings
