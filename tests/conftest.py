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


@pytest.fixture(scope="session")
def strip_bundle(fashion_mnist: Dataset):
    """The shipped bundle with STRIP added to its signals (at its STRIP config's N and blend) and calibrated, in
    memory, on the clean calibration split as `python -m training calibrate` does: STRIP left the default
    signals (make cost), and a bundle that lists it still runs it, early exit and all."""
    from service.bundle import Bundle
    from service.preprocess import to_model_input
    from training.calibration import CalibrationConfig, calibrate

    bundle = Bundle.load(MODELS)
    bundle.manifest["signals"] = {**bundle.manifest["signals"], "strip": dict(bundle.manifest["configs"]["strip"])}
    images, labels = to_model_input(fashion_mnist.calibration.images), fashion_mnist.calibration.labels
    bundle.manifest["thresholds"], _ = calibrate(bundle, images, labels, CalibrationConfig())
    return bundle
