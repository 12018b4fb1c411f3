"""The repaired model (training.repair: fine-pruning and unlearning on clean data) as a second opinion.

It classifies the same image; where the backdoor fired in the original model and not in the repaired one, the
original label loses most of its probability. The score is that drop, calibrated on clean images, where the
two models agree. The repaired model's label is also the guard's label source for flagged images.
"""

from __future__ import annotations

import numpy as np

from service.signals.base import Prediction, SecondOpinion, SignalResult, drop_result


class RepairedSignal(SecondOpinion):
    name = "repaired"
    model = "repaired_classifier"
    stage = "repair"

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        return drop_result(original, pred, self.threshold, labels=pred.labels)

    @classmethod
    def threshold_bounds(cls, classes: int) -> tuple[float, float] | None:
        return (-1.0, 1.0)
