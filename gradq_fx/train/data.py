"""Training data: Fashion-MNIST from IDX files, or an ImageFolder-style directory of images.

Two layouts are recognised in a data directory:
- IDX files, as Debian's `dataset-fashion-mnist` installs them (gzipped or not):
  train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte;
- ImageFolder: `train/` and `val/` (or `test/`), each with one subfolder of images per class.

A dataset yields (uint8 image [C, S, S], label) already fitted to the model's input size S
(`fit_to_size`); C is 1 for grayscale IDX data and 3 for image folders. `BatchTransform` then
turns a batch into the model's float input: 3 channels, augmentation (training only), and
normalisation. Augmentation runs on whole batches in the training process, drawing from a
generator the caller seeds, so the random crops and flips depend only on (seed, epoch, rank),
not on the number of data-loading workers.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
EVAL_FOLDERS = ("val", "test")  # the first one present is the ImageFolder evaluation split
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

_IDX_UINT8 = 0x08  # the IDX type code of unsigned bytes
_GZIP_MAGIC = b"\x1f\x8b"
# How many training images the normalisation statistics are measured on.
STATS_IMAGES = 1000

MISSING_DATA_HELP = (
    "Fashion-MNIST is installed by Debian's package: `sudo apt-get install dataset-fashion-mnist` "
    f"(files under {DEFAULT_DATA_DIR}). Or pass --data-dir DIR holding the four IDX files "
    f"({', '.join(name for pair in IDX_FILES.values() for name in pair)}, gzipped or not), or "
    "an ImageFolder directory with train/ and val/ (or test/), one subfolder per class."
)


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (gzipped or not) into a uint8 tensor of its shape.

    Format: two zero bytes, a type code (0x08 for uint8), the number of dimensions, each
    dimension as a big-endian uint32, then the values in row-major order. Raises ValueError
    naming the file when the header or the payload size is wrong.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{path}: corrupt gzip data ({error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (the first two bytes must be zero)")
    type_code, ndim = raw[2], raw[3]
    if type_code != _IDX_UINT8:
        raise ValueError(
            f"{path}: IDX type code 0x{type_code:02x} is not supported (only 0x08, uint8)"
        )
    header_size = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_size:
        raise ValueError(f"{path}: IDX header declares {ndim} dimensions but is truncated")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(dims)
    if len(raw) - header_size != expected:
        raise ValueError(
            f"{path}: IDX header says {dims} ({expected} bytes of data), "
            f"but the file holds {len(raw) - header_size}"
        )
    payload = bytearray(raw[header_size:])
    return torch.frombuffer(payload, dtype=torch.uint8).reshape(dims)


def fit_to_size(image: torch.Tensor, size: int) -> torch.Tensor:
    """Fit a uint8 image [C, H, W] to [C, size, size].

    An image that fits and is at most a quarter smaller (Fashion-MNIST's 28 px at 32) is
    zero-padded around its centre, which keeps its pixels exact. Otherwise the shorter side
    is resized to `size` (bilinear, antialiased) and the centre cropped.
    """
    _, height, width = image.shape
    if height == width == size:
        return image
    longest = max(height, width)
    if longest <= size and 4 * (size - longest) <= longest:
        top, left = (size - height) // 2, (size - width) // 2
        return F.pad(image, (left, size - width - left, top, size - height - top))
    scale = size / min(height, width)
    new_height = max(size, round(height * scale))
    new_width = max(size, round(width * scale))
    resized = F.interpolate(
        image[None].float(),
        size=(new_height, new_width),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )[0]
    top, left = (new_height - size) // 2, (new_width - size) // 2
    cropped = resized[:, top : top + size, left : left + size]
    return cropped.round().clamp(0, 255).to(torch.uint8)


class TensorImages(Dataset):
    """Images held in memory as uint8 [N, H, W] (grayscale) or [N, C, H, W], with labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int):
        if images.dim() == 3:
            images = images[:, None]
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels, self.size = images, labels.long(), size

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return fit_to_size(self.images[index], self.size), int(self.labels[index])


class ImageFiles(Dataset):
    """Image files with labels, decoded with Pillow to RGB when read."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], size: int):
        self.files, self.labels, self.size = list(files), list(labels), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[index]) as image:
            rgb = image.convert("RGB")
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        pixels = pixels.reshape(rgb.height, rgb.width, 3).permute(2, 0, 1)
        return fit_to_size(pixels, self.size), self.labels[index]


@dataclasses.dataclass
class Datasets:
    """The training and test splits, what they hold, and the normalisation of their pixels."""

    train: Dataset
    test: Dataset
    classes: list[str]
    source: str  # a description for logs: the directory and its layout
    mean: tuple[float, ...] = ()  # per channel of the dataset's images, in [0, 1]
    std: tuple[float, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _idx_path(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx(directory: Path, size: int) -> tuple[Dataset, Dataset, list[str]]:
    splits = {}
    for split, (images_name, labels_name) in IDX_FILES.items():
        images_path = _idx_path(directory, images_name)
        labels_path = _idx_path(directory, labels_name)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{images_path} ({list(images.shape)}) and {labels_path} ({list(labels.shape)}) "
                "do not hold N images [N, H, W] and N labels [N]"
            )
        splits[split] = (images, labels)
    num_classes = int(splits["train"][1].max()) + 1
    if int(splits["test"][1].max()) >= num_classes:
        raise ValueError(f"{directory}: test labels go beyond the {num_classes} training classes")
    datasets = {
        split: TensorImages(images, labels, size) for split, (images, labels) in splits.items()
    }
    return datasets["train"], datasets["test"], [str(c) for c in range(num_classes)]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _load_image_folder(directory: Path, size: int) -> tuple[Dataset, Dataset, list[str]]:
    train_dir = directory / "train"
    eval_dir = next(directory / name for name in EVAL_FOLDERS if (directory / name).is_dir())
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"--data-dir: {train_dir} has no class subfolders. {MISSING_DATA_HELP}")
    unknown = sorted(p.name for p in eval_dir.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise ValueError(f"--data-dir: {eval_dir} has classes {unknown} that train/ lacks")

    def split(folder: Path) -> Dataset:
        files, labels = [], []
        for label, name in enumerate(classes):
            found = _image_files(folder / name) if (folder / name).is_dir() else []
            files += found
            labels += [label] * len(found)
        if not files:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise ValueError(f"--data-dir: no images ({suffixes}) in the class folders of {folder}")
        return ImageFiles(files, labels, size)

    return split(train_dir), split(eval_dir), classes


def _layout(directory: Path) -> str | None:
    """'idx', 'folder', or None when the directory holds neither."""
    if all(_idx_path(directory, name) for pair in IDX_FILES.values() for name in pair):
        return "idx"
    has_eval = any((directory / name).is_dir() for name in EVAL_FOLDERS)
    if (directory / "train").is_dir() and has_eval:
        return "folder"
    return None


def channel_stats(dataset: Dataset, limit: int = STATS_IMAGES) -> tuple[tuple, tuple]:
    """Per-channel mean and standard deviation of the pixels (in [0, 1]) of the first images."""
    total = total_sq = None
    count = 0
    for index in range(min(limit, len(dataset))):
        pixels = dataset[index][0].double().flatten(1) / 255
        total = pixels.sum(1) if total is None else total + pixels.sum(1)
        total_sq = (pixels**2).sum(1) if total_sq is None else total_sq + (pixels**2).sum(1)
        count += pixels.shape[1]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def load_datasets(
    data_dir: str | Path | None,
    img_size: int,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> Datasets:
    """Find and load the data in `data_dir` (default: Debian's Fashion-MNIST directory).

    `train_subset` / `test_subset` keep the first N images of each split. Raises ValueError
    saying how to get the data when the directory holds neither layout.
    """
    directory = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    layout = _layout(directory) if directory.is_dir() else None
    if layout is None:
        state = "does not hold the data" if directory.is_dir() else "does not exist"
        raise ValueError(f"--data-dir: {directory} {state}. {MISSING_DATA_HELP}")
    loader = _load_idx if layout == "idx" else _load_image_folder
    train, test, classes = loader(directory, img_size)
    if train_subset is not None:
        train = torch.utils.data.Subset(train, range(min(train_subset, len(train))))
    if test_subset is not None:
        test = torch.utils.data.Subset(test, range(min(test_subset, len(test))))
    source = f"{directory} ({'IDX files' if layout == 'idx' else 'image folders'})"
    datasets = Datasets(train, test, classes, source)
    datasets.mean, datasets.std = channel_stats(train)
    return datasets


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Crop each image [B, C, H, W] at a random offset from its copy zero-padded on all sides."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4).permute(0, 2, 3, 1)  # [B, H + 2p, W + 2p, C]
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]  # [B, H, 1]
    cols = (dx[:, None] + torch.arange(width))[:, None, :]  # [B, 1, W]
    cropped = padded[torch.arange(batch)[:, None, None], rows, cols]  # [B, H, W, C]
    return cropped.permute(0, 3, 1, 2).contiguous()


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image [B, C, H, W] left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


@dataclasses.dataclass(frozen=True)
class BatchTransform:
    """uint8 batch [B, C, S, S] -> normalised float [B, 3, S, S], augmented when training.

    Augmentation: a random crop after zero padding by S/8 on each side, and a random
    horizontal flip.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = True

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training batches pass their generator; evaluation batches pass None (no augmentation)."""
        x = images.float() / 255
        if self.augment and generator is not None:
            x = random_crop(x, max(1, x.shape[-1] // 8), generator)
            x = random_flip(x, generator)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
        return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x
