"""The repaired model (training.repair: fine-pruning and unlearning on clean data) as a second opinion.

It classifies the same image; where the backdoor fired in the original model and not in the repaired one, the
original label loses most of its probability. The score is that drop, calibrated on clean images, where the
two models agree. The repaired model's label is also the guard's label source for flagged images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from service.signals.base import Prediction, Signal, SignalResult, drop_result

if TYPE_CHECKING:
    from service.bundle import Bundle


class RepairedSignal(Signal):
    name = "repaired"
    model = "repaired_classifier"

    def __init__(self, threshold: float | None) -> None:
        self.threshold = threshold

    @classmethod
    def from_bundle(cls, bundle: Bundle, params: Mapping[str, Any], threshold: float | None) -> RepairedSignal:
        if "repaired_classifier" not in bundle.sessions:
            raise ValueError("the repaired signal needs the bundle's repaired_classifier (python -m training repair)")
        return cls(threshold)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return x  # the same images, through the repaired model

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        return drop_result(original, pred, self.threshold, labels=pred.labels)

    @classmethod
    def threshold_bounds(cls, classes: int) -> tuple[float, float] | None:
        return (-1.0, 1.0)
