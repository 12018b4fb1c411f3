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


def overlay_entropies(probs: np.ndarray, n: int) -> np.ndarray:
    """(B * n, C) predictions of n overlays per image, image-major -> (B, n) per-copy entropies (log2)."""
    return entropy_bits(probs).reshape(-1, n)


def strip_entropy(probs: np.ndarray, n: int) -> np.ndarray:
    """(B * N, C) predictions of the overlays -> (B,) mean per-copy entropy (Gao et al., log2)."""
    return overlay_entropies(probs, n).mean(axis=1)


def strip_threshold(entropies: np.ndarray, fpr: float) -> tuple[float, float, float]:
    """Gao et al.: fit a normal to clean entropies; the threshold is its `fpr` percentile. (thr, mean, std)"""
    mean, std = float(entropies.mean()), float(entropies.std(ddof=1))
    return mean + std * NormalDist().inv_cdf(fpr), mean, std


# Overlays done before each early-exit check (then the rest: rounds at or above N are dropped); see
# StripSignal.rounds. Chosen at N = 16 by replaying the exits on per-overlay entropies (a scratch script, not a
# repo command; 2,000 test images): on the shipped bundle's clean images 2.35 overlays per image on average for
# (1, 3, 8), 3.32 for (2, 8), 5.31 for (4,). At N = 4 the rounds are 1, 3, 4 (`make bench` counts them).
ROUNDS = (1, 3, 8)


class StripSignal(Signal):
    """STRIP over the bank's first N images. With a fused verdict the guard may stop early (`rounds`): after the
    first overlays of each round it bounds the mean entropy of all N (`score_range`) and stops an image whose
    verdict no remaining overlay can change (GuardPipeline.run)."""

    name = "strip"

    def __init__(self, bank: np.ndarray, n: int, blend: Blend, threshold: float | None,
                 rounds: tuple[int, ...] = ROUNDS) -> None:  # fmt: skip
        if not 1 <= n <= len(bank):
            raise ValueError(f"STRIP n must be in [1, {len(bank)}] (the bank's size), got {n}")
        if any(r < 1 for r in rounds) or list(rounds) != sorted(set(rounds)):
            raise ValueError(f"STRIP rounds must be increasing overlay counts >= 1, got {list(rounds)}")
        self.overlays = np.ascontiguousarray(bank[:n], dtype=np.float32)
        self.n, self.blend, self.threshold = n, blend, threshold
        self.rounds = (*(r for r in rounds if r < n), n)  # cumulative overlays after each round; the last is N

    @classmethod
    def from_bundle(cls, bundle: Bundle, params: Mapping[str, Any], threshold: float | None) -> StripSignal:
        strip = bundle.manifest["configs"]["strip"]
        n, blend = int(params.get("n", strip["n"])), params.get("blend", strip["blend"])
        return cls(bundle.strip_bank, n, blend, threshold, tuple(params.get("rounds", ROUNDS)))

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return superimpose(x, self.overlays, self.blend)

    def prepare_round(self, x: np.ndarray, r: int) -> np.ndarray:
        """Round r's overlays of images x (round 0: the first `rounds[0]`)."""
        start = self.rounds[r - 1] if r else 0
        return superimpose(x, self.overlays[start : self.rounds[r]], self.blend)

    def calibrated_with(self) -> dict[str, Any]:
        return {"n": self.n, "blend": self.blend}  # its threshold and fusion table hold only at this N and blend

    def score_range(self, total: np.ndarray, done: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
        """The least and largest score (minus the mean entropy of all N overlays) an image can still reach, given
        the sum of its first `done` overlays' entropies: each remaining one adds an entropy in [0, log2 C]
        (widened by a float32 rounding's worth per overlay, so that no rounding can put the final score outside)."""
        rest = (self.n - done) * np.log2(classes)
        slack = 1e-5 * self.n
        return -(total + rest + slack) / self.n, -(total - slack) / self.n

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        entropy = strip_entropy(pred.probs, self.n)
        return self.result(entropy, np.full(len(x), self.n))

    def result(self, entropy: np.ndarray, overlays: np.ndarray) -> SignalResult:
        """The signal's result from each image's mean entropy over the `overlays` it was given (N, or fewer where
        the guard stopped early: then the mean is an estimate, and the verdict was decided without it)."""
        below = entropy <= self.threshold if self.threshold is not None else np.zeros(len(entropy), bool)
        return SignalResult(score=-entropy, triggered=below, evidence={"entropy": entropy, "overlays": overlays})

    @classmethod
    def fit(cls, results: SignalResult, fpr: float) -> dict[str, Any]:
        """The paper's normal fit to clean entropies (the score is minus the entropy)."""
        entropy = -results.score
        threshold, mean, std = strip_threshold(entropy, fpr)
        if not std > 0:  # no spread (or NaN): the normal's 1% point is its mean, and every clean image would flag
            raise ValueError(f"STRIP's clean entropies have no spread (std {std}): no threshold can be fitted to them")
        return {
            "threshold": threshold, "entropy_mean": mean, "entropy_std": std,
            "calibration_fpr": float(np.mean(entropy <= threshold)),
        }  # fmt: skip

    @classmethod
    def threshold_bounds(cls, classes: int, params: Mapping[str, Any] | None = None) -> tuple[float, float] | None:
        # An entropy in bits; below 0 is legitimate: a normal fitted to skewed clean entropies (Gao et al.) can
        # put its 1% point there, and the signal then never fires on its own (fusion still uses it).
        return (-np.inf, float(np.log2(classes)))

    @classmethod
    def score_bounds(cls, classes: int, params: Mapping[str, Any] | None = None) -> tuple[float, float]:
        return (-float(np.log2(classes)) - 1e-6, 0.0)  # minus a mean entropy in bits (and a float32 rounding)

    def report(self, result: SignalResult, i: int) -> dict[str, Any]:
        return {**super().report(result, i), "n": self.n}
