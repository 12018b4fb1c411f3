"""Cao's masked-autoencoder restoration: a calibrated drop in the original label's confidence -> backdoor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from service.signals.base import ImageModel, Prediction, Signal, SignalResult, drop_result

if TYPE_CHECKING:
    from service.bundle import Bundle


class MaskedAESignal(Signal):
    name = "masked_ae"

    def __init__(self, restore: ImageModel, threshold: float | None) -> None:
        self.restore = restore
        self.threshold = threshold

    @classmethod
    def from_bundle(cls, bundle: Bundle, params: Mapping[str, Any], threshold: float | None) -> MaskedAESignal:
        return cls(bundle.image_model("masked_ae"), threshold)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return self.restore(x)

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        return drop_result(original, pred, self.threshold, images=extra)

    @classmethod
    def threshold_bounds(cls, classes: int, params: Mapping[str, Any] | None = None) -> tuple[float, float] | None:
        return (-1.0, 1.0)  # a drop in probability
