from pathlib import Path

import pytest

from training.data import DataConfig, DataMissingError, Dataset, load_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


@pytest.fixture(scope="session")
def fashion_mnist() -> Dataset:
    """The real dataset; `make test` installs it. Missing data fails loudly rather than skipping."""
    try:
        return load_fashion_mnist(DataConfig())
    except DataMissingError as err:
        pytest.fail(str(err))
