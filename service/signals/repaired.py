"""The repaired model (training.repair: fine-pruning and unlearning on clean data) as a second opinion.

It classifies the same image; where the backdoor fired in the original model and not in the repaired one, the
two models' output distributions part. The score (manifest `signals.repaired.score`) is how far they part:

  "jeffreys" (bundles exported since it exists): the symmetric Kullback-Leibler divergence between the two
      softmax outputs, sum_c (p_c - q_c)(log p_c - log q_c), in nats. A fired trigger makes the original sure
      of the attacker's label while the repaired model puts almost nothing there and its mass on the true
      label, which the original gives almost nothing: both directions of the divergence are large. Where
      the two models merely hesitate between the same neighbouring labels (the clean tail), both are small.
  "drop" (bundles exported before it): how much the repaired model lowers the probability of the original
      label, in [-1, 1]. It saturates at 1, so the clean images on which two models disagree outright tie
      with triggered ones; `make evaluate` measured the divergence better on every suite attack.

Either is calibrated on clean images; the manifest check refuses a threshold fitted to the other score. The
repaired model's label is also the guard's label source for flagged images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from service.signals.base import Prediction, SecondOpinion, SignalResult, above, confidence_drop

if TYPE_CHECKING:
    from service.bundle import Bundle

SCORES = ("jeffreys", "drop")
LEGACY_SCORE = "drop"  # what a bundle whose manifest names no score was calibrated with


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def jeffreys(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Symmetric KL divergence (nats) between the softmax outputs of two logit arrays (B, C) -> (B,), >= 0.
    Each term (p - q)(log p - log q) is >= 0, so rounding never makes it negative; finite for finite logits."""
    la, lb = log_softmax(a), log_softmax(b)
    return ((np.exp(la) - np.exp(lb)) * (la - lb)).sum(axis=1)


class RepairedSignal(SecondOpinion):
    name = "repaired"
    model = "repaired_classifier"
    stage = "repair"

    def __init__(self, threshold: float | None, score: str = "jeffreys") -> None:
        if score not in SCORES:
            raise ValueError(f"unknown repaired score {score!r}; choose from {SCORES}")
        super().__init__(threshold)
        self.score = score

    @classmethod
    def from_bundle(cls, bundle: Bundle, params: Mapping[str, Any], threshold: float | None) -> RepairedSignal:
        super().from_bundle(bundle, params, threshold)  # checks the bundle has the repaired model
        return cls(threshold, str(params.get("score", LEGACY_SCORE)))

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        drop = confidence_drop(original, pred)
        score = jeffreys(original.logits, pred.logits) if self.score == "jeffreys" else drop
        evidence = {"label": pred.labels, "confidence": pred.confidence, "drop": drop, "score": score}
        return SignalResult(score=score, triggered=above(score, self.threshold), evidence=evidence, labels=pred.labels)

    def calibrated_with(self) -> dict[str, Any]:
        return {"score": self.score}

    @classmethod
    def threshold_bounds(cls, classes: int, params: Mapping[str, Any] | None = None) -> tuple[float, float] | None:
        score = (params or {}).get("score", LEGACY_SCORE)
        return (-1.0, 1.0) if score == "drop" else (0.0, np.inf)

    @classmethod
    def parameter_problems(cls, params: Mapping[str, Any], calibrated: Mapping[str, Any] | None) -> list[str]:
        runs = params.get("score", LEGACY_SCORE)
        if runs not in SCORES:
            return [f"signals.repaired.score: {runs!r} is not one of {list(SCORES)}"]
        fitted = None if calibrated is None else calibrated.get("score", LEGACY_SCORE)
        if fitted is not None and fitted != runs:
            return [f"thresholds.repaired.score: calibrated for {fitted!r}, the signal runs {runs!r}"]
        return []
