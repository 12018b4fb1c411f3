"""STRIP (Gao et al.): superimpose N clean bank images; a trigger keeps every copy on its label -> low entropy."""

from __future__ import annotations

from collections.abc import Mapping
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from service.signals.base import Prediction, Signal, SignalResult, entropy_bits

if TYPE_CHECKING:
    from service.bundle import Bundle

Blend = Literal["sum", "mean"]


def superimpose(images: np.ndarray, overlays: np.ndarray, blend: Blend = "sum") -> np.ndarray:
    """(B, C, H, W) x (N, C, H, W) -> (B * N, C, H, W), image-major.

    "sum" is STRIP's original code (x + overlay, no clipping); "mean" is ART's 0.5 x + 0.5 overlay.
    """
    mixed = images[:, None] + overlays[None]  # (B, N, C, H, W)
    if blend == "mean":
        mixed = mixed * np.float32(0.5)
    return mixed.reshape(-1, *images.shape[1:]).astype(np.float32, copy=False)


def strip_entropy(probs: np.ndarray, n: int) -> np.ndarray:
    """(B * N, C) predictions of the overlays -> (B,) mean per-copy entropy (Gao et al., log2)."""
    return entropy_bits(probs).reshape(-1, n).mean(axis=1)


def strip_threshold(entropies: np.ndarray, fpr: float) -> tuple[float, float, float]:
    """Gao et al.: fit a normal to clean entropies; the threshold is its `fpr` percentile. (thr, mean, std)"""
    mean, std = float(entropies.mean()), float(entropies.std(ddof=1))
    return mean + std * NormalDist().inv_cdf(fpr), mean, std


class StripSignal(Signal):
    name = "strip"

    def __init__(self, bank: np.ndarray, n: int, blend: Blend, threshold: float | None) -> None:
        if not 1 <= n <= len(bank):
            raise ValueError(f"STRIP n must be in [1, {len(bank)}] (the bank's size), got {n}")
        self.overlays = np.ascontiguousarray(bank[:n], dtype=np.float32)
        self.n, self.blend, self.threshold = n, blend, threshold

    @classmethod
    def from_bundle(cls, bundle: Bundle, params: Mapping[str, Any], threshold: float | None) -> StripSignal:
        strip = bundle.manifest["configs"]["strip"]
        return cls(bundle.strip_bank, int(params.get("n", strip["n"])), params.get("blend", strip["blend"]), threshold)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return superimpose(x, self.overlays, self.blend)

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        entropy = strip_entropy(pred.probs, self.n)
        below = entropy <= self.threshold if self.threshold is not None else np.zeros(len(x), bool)
        return SignalResult(score=-entropy, triggered=below, evidence={"entropy": entropy})

    @classmethod
    def fit(cls, results: SignalResult, fpr: float) -> dict[str, Any]:
        """The paper's normal fit to clean entropies (the score is minus the entropy)."""
        entropy = -results.score
        threshold, mean, std = strip_threshold(entropy, fpr)
        return {
            "threshold": threshold, "entropy_mean": mean, "entropy_std": std,
            "calibration_fpr": float(np.mean(entropy <= threshold)),
        }  # fmt: skip

    @classmethod
    def threshold_bounds(cls, classes: int) -> tuple[float, float] | None:
        # An entropy in bits; below 0 is legitimate: a normal fitted to skewed clean entropies (Gao et al.) can
        # put its 1% point there, and the signal then never fires on its own (fusion still uses it).
        return (-np.inf, float(np.log2(classes)))

    def report(self, result: SignalResult, i: int) -> dict[str, Any]:
        return {**super().report(result, i), "n": self.n}
