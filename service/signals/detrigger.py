"""Kwon's de-trigger autoencoder and flag rule: restore; the label before and after differ -> backdoor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from service.signals.base import ImageModel, Prediction, Signal, SignalResult, confidence_drop

if TYPE_CHECKING:
    from service.bundle import Bundle


class DetriggerSignal(Signal):
    """The score is the restoration's drop in the original label's probability; the verdict is the label change."""

    name = "detrigger"

    def __init__(self, restore: ImageModel) -> None:
        self.restore = restore

    @classmethod
    def from_bundle(cls, bundle: Bundle, params: Mapping[str, Any], threshold: float | None) -> DetriggerSignal:
        return cls(bundle.image_model("detrigger_ae"))

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return self.restore(x)

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        return SignalResult(
            score=confidence_drop(original, pred),
            triggered=pred.labels != original.labels,
            evidence={"label": pred.labels, "confidence": pred.confidence},
            images=extra,
            labels=pred.labels,
        )

    @classmethod
    def fit(cls, results: SignalResult, fpr: float) -> dict[str, Any]:
        """Kwon's rule has no threshold: its clean flag rate is recorded."""
        return {"rule": "label_change", "calibration_fpr": float(np.mean(results.triggered))}

    @classmethod
    def threshold_bounds(cls, classes: int, params: Mapping[str, Any] | None = None) -> tuple[float, float] | None:
        return None

    @classmethod
    def score_bounds(cls, classes: int, params: Mapping[str, Any] | None = None) -> tuple[float, float]:
        return (-1.0, 1.0)  # a drop in probability
