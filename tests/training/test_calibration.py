"""Calibration (training/calibration.py): what it records, and what it says when it cannot be trusted."""

import json
import logging

import numpy as np
import pytest

from service.guard import SignalResult
from service.signals.strip import StripSignal
from tests.conftest import MODELS
from training.calibration import FEW_ABOVE, FUSION_LEVELS, CalibrationConfig, fit_thresholds


def halves(n: int, rng: np.random.Generator) -> dict[str, SignalResult]:
    return {
        "detrigger": SignalResult(rng.uniform(-0.2, 0.2, n), rng.random(n) < 0.01),
        "expert": SignalResult(-rng.exponential(1.0, n), np.zeros(n, bool)),
    }


def test_the_fusion_levels_are_those_the_manifest_records() -> None:
    """Half B is scored with the levels the service loads: the same float64 values after the JSON round trip."""
    assert json.loads(json.dumps(FUSION_LEVELS.tolist())) == FUSION_LEVELS.tolist()
    shipped = json.loads((MODELS / "manifest.json").read_text())["thresholds"]["fused"]["levels"]
    assert shipped == FUSION_LEVELS.tolist()


def test_a_threshold_on_too_few_clean_images_is_said_and_recorded(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    config = CalibrationConfig()
    with caplog.at_level(logging.WARNING, logger="training.calibration"):
        enough = fit_thresholds(halves(2000, rng), halves(int(FEW_ABOVE / config.target_fpr), rng), config)
    assert not caplog.records and enough["fused"]["calibration_images"] == FEW_ABOVE / config.target_fpr
    with caplog.at_level(logging.WARNING, logger="training.calibration"):
        few = fit_thresholds(halves(2000, rng), halves(300, rng), config)
    assert few["fused"]["calibration_images"] == 300
    assert "rests on 3.0 clean images above it (300 in calibration half B" in caplog.text


def test_strip_refuses_clean_entropies_without_spread() -> None:
    """A normal of no spread puts its 1% point at its mean: every clean image would flag."""
    flat = SignalResult(np.full(50, -0.5), np.zeros(50, bool))
    with pytest.raises(ValueError, match="no spread"):
        StripSignal.fit(flat, 0.01)
    spread = SignalResult(-np.random.default_rng(0).uniform(0.5, 2.0, 50), np.zeros(50, bool))
    assert StripSignal.fit(spread, 0.01)["calibration_fpr"] < 0.1


@pytest.mark.parametrize(
    "change", [{"label_source": "repaired"}, {"fusion": "mean"}, {"strip_blend": "max"}, {"target_fpr": 0.0}]
)
def test_a_calibration_config_with_a_value_outside_its_choices_is_refused(change: dict) -> None:
    """From JSON (a manifest's configs) any string would do: "repaired" would silently run as "best"."""
    with pytest.raises(ValueError, match=next(iter(change))):
        CalibrationConfig(**change)
