"""Neural Cleanse's filter: mean activation of the neurons its reversed trigger excites most."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from service.signals.base import Prediction, Signal, SignalResult, above

if TYPE_CHECKING:
    from service.bundle import Bundle


class ActivationSignal(Signal):
    name = "activation"

    def __init__(self, neurons: Mapping[int, Sequence[int]], threshold: float | None) -> None:
        if not neurons:
            raise ValueError("the activation filter needs at least one label's neurons")
        self.neurons = {int(t): np.asarray(idx, dtype=np.int64) for t, idx in neurons.items()}
        self.threshold = threshold

    @classmethod
    def from_bundle(cls, bundle: Bundle, params: Mapping[str, Any], threshold: float | None) -> ActivationSignal:
        neurons = bundle.manifest["neural_cleanse"]["activation_neurons"]
        return cls({int(k): v for k, v in neurons.items()}, threshold)

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        per_label = np.stack([original.features[:, idx].mean(axis=1) for idx in self.neurons.values()])
        score = per_label.max(axis=0)
        return SignalResult(score=score, triggered=above(score, self.threshold), evidence={"score": score})
