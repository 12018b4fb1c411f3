"""The backdoor expert (training.expert, after BaDExpert): a copy of the classifier fine-tuned on mislabelled
clean data, which has unlearned the classes but kept the backdoor.

It classifies the same image. On a clean image the expert has lost the evidence for the model's label; on a
triggered one the backdoor still fires in it and it keeps giving the model's (the attacker's) label with
confidence. The score is the expert's log-probability of the model's label: higher = more suspicious,
calibrated on clean images. One more pass per image, through its own ONNX model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from service.signals.base import Prediction, SecondOpinion, SignalResult, above


def log_prob(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log softmax(logits)[i, labels[i]] in float64, finite and ordered where probabilities round to 1:
    -log(sum_j exp(z_j - z_y)), with log1p over the other labels when y is the top one (a margin of 40
    leaves exp(-40) = 4e-18, below float64's step at 1 but not below log1p's)."""
    z = logits.astype(np.float64)
    rows = np.arange(len(z))
    d = z - z[rows, labels][:, None]  # d[y] = 0
    top = np.maximum(d.max(axis=1), 0.0)  # 0 when y is the top label
    others = np.exp(d - top[:, None])
    others[rows, labels] = 0.0
    rest = others.sum(axis=1)
    with np.errstate(divide="ignore"):
        total = np.where(top == 0, np.log1p(rest), np.log(np.exp(-top) + rest))
    return -(top + total)


class ExpertSignal(SecondOpinion):
    name = "expert"
    model = "backdoor_expert"
    stage = "expert"

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        score = log_prob(pred.logits, original.labels)
        evidence = {"label": pred.labels, "agreement": np.exp(score), "score": score}
        return SignalResult(score=score, triggered=above(score, self.threshold), evidence=evidence)

    @classmethod
    def threshold_bounds(cls, classes: int, params: Mapping[str, Any] | None = None) -> tuple[float, float] | None:
        return (-np.inf, 0.0)  # a log-probability
