"""Feature squeezing (Xu et al., in the survey seed): squeeze the input (fewer bits, median smoothing) and
compare predictions; a large L1 gap between the softmax outputs flags the input. Two extra passes per image.

A trigger the model reacts to with a confident, brittle decision tends to move when its fine detail is
quantised or smoothed away; a clean image's prediction rests on coarse shape and stays put.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from service.signals.base import Prediction, Signal, SignalResult, above

if TYPE_CHECKING:
    from service.bundle import Bundle


def reduce_bits(x: np.ndarray, bits: int) -> np.ndarray:
    """Quantise [0, 1] values to 2**bits levels (Xu et al.'s bit-depth squeezer)."""
    levels = np.float32(2**bits - 1)
    return np.rint(x * levels) / levels


def median_smooth(x: np.ndarray, size: int) -> np.ndarray:
    """size x size median over each channel (window anchored top-left, edges replicated), as Xu et al.'s 2x2."""
    pad = np.pad(x, ((0, 0), (0, 0), (0, size - 1), (0, size - 1)), mode="edge")
    height, width = x.shape[-2:]
    windows = [pad[..., i : i + height, j : j + width] for i in range(size) for j in range(size)]
    return np.median(np.stack(windows), axis=0).astype(np.float32)


class SqueezeSignal(Signal):
    name = "squeeze"

    def __init__(self, bits: int, median: int, threshold: float | None) -> None:
        if not 1 <= bits <= 8 or median < 2:
            raise ValueError(f"squeeze needs 1 <= bits <= 8 and a median window >= 2, got {bits} and {median}")
        self.bits, self.median, self.threshold = bits, median, threshold

    @classmethod
    def from_bundle(cls, bundle: Bundle, params: Mapping[str, Any], threshold: float | None) -> SqueezeSignal:
        return cls(int(params.get("bits", 3)), int(params.get("median", 2)), threshold)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([reduce_bits(x, self.bits), median_smooth(x, self.median)])

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        probs, n = original.probs, len(x)
        squeezed = pred.probs.reshape(2, n, -1)  # (squeezer, B, C)
        gaps = np.abs(squeezed - probs[None]).sum(axis=2)  # L1 per squeezer
        score = gaps.max(axis=0)
        return SignalResult(
            score=score,
            triggered=above(score, self.threshold),
            evidence={"score": score, "bits_label": pred.labels[:n], "median_label": pred.labels[n:]},
        )

    @classmethod
    def threshold_bounds(cls, classes: int, params: Mapping[str, Any] | None = None) -> tuple[float, float] | None:
        return (0.0, 2.0)  # an L1 distance between two probability vectors

    def calibrated_with(self) -> dict[str, Any]:
        return {"bits": self.bits, "median": self.median}  # its threshold and fusion table hold only for these

    @classmethod
    def parameter_problems(cls, params: Mapping[str, Any], calibrated: Mapping[str, Any] | None) -> list[str]:
        problems = []
        for key, lo, hi, default in (("bits", 1, 8, 3), ("median", 2, None, 2)):  # as __init__ requires
            runs = params.get(key, default)
            if not isinstance(runs, int) or isinstance(runs, bool) or runs < lo or (hi is not None and runs > hi):
                want = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
                problems.append(f"signals.squeeze.{key}: {runs!r}, must be an integer {want}")
            elif calibrated is not None and key in calibrated and calibrated[key] != runs:
                problems.append(f"thresholds.squeeze.{key}: calibrated at {calibrated[key]!r}, the signal runs {runs}")
        return problems
