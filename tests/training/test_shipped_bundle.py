"""The bundle shipped in models/ (built by `python -m training all --out models`) meets its bars."""

import json

import pytest

from service.bundle import Bundle, sha256_file
from service.preprocess import to_model_input
from tests.bundle_checks import REQUIRED_KEYS, parity_gaps
from tests.conftest import MODELS
from training.attacks import PRESETS
from training.metrics import evaluate
from training.report import bars

SUBSET = 2000  # test images; the report in models/ has the full 10,000


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((MODELS / "manifest.json").read_text())


def test_manifest_hashes_match_the_files(manifest: dict) -> None:
    assert set(manifest) >= REQUIRED_KEYS
    for entry in [*manifest["files"].values(), *manifest["checkpoints"].values()]:
        path = MODELS / entry["path"]
        assert path.stat().st_size < 5 << 20, f"{path} is too large to ship"
        assert sha256_file(path) == entry["sha256"], path


def test_shipped_files_are_the_kwon_bundle(manifest: dict) -> None:
    assert manifest["name"] == "fashion-mnist-kwon"
    assert manifest["configs"]["attack_preset"] == "kwon"
    assert manifest["configs"]["limits"] == {"train": None, "calibration": None, "test": None}  # not a smoke run


@pytest.mark.data
def test_onnx_parity_on_real_images(fashion_mnist) -> None:
    gaps = parity_gaps(MODELS, to_model_input(fashion_mnist.test.images[:256]))
    assert max(gaps.values()) <= 1e-4, gaps


def test_recorded_bars_are_met(manifest: dict) -> None:
    """What the build measured on the full test set (models/report.md) meets every bar."""
    failed = [(what, value, bar) for what, value, bar, ok in bars(manifest) if not ok]
    assert not failed


@pytest.mark.data
@pytest.mark.slow
def test_bars_hold_when_measured_again(fashion_mnist) -> None:
    """Re-measure with ONNX Runtime on a 2,000-image subset of the test set, through the service's pipeline."""
    test = fashion_mnist.test.head(SUBSET)
    m = evaluate(Bundle.load(MODELS), to_model_input(test.images), test.labels, PRESETS["kwon"])
    assert m["classifier"]["clean_accuracy"] >= 0.90
    assert m["classifier"]["attack_success"] >= 0.99
    det = m["detrigger"]
    assert det["clean_accuracy_after"] >= 0.89
    assert det["triggered_accuracy_after"] >= 0.88
    assert det["fpr"] <= 0.05
    assert det["tpr"] >= 0.95
    assert m["fused"]["fpr"] <= 0.02 and m["fused"]["tpr"] >= 0.98


def test_neural_cleanse_flags_only_the_target(manifest: dict) -> None:
    nc = manifest["neural_cleanse"]
    assert nc["flagged_labels"] == [0]
    assert nc["anomaly_index"][0] > 2
    assert manifest["metrics"]["control"]["flagged_labels"] == []  # same recipe, no poison
