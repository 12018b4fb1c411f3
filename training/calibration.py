"""Stages 7-8: the STRIP bank and the thresholds, from clean calibration data only.

The calibration split (5,000 images the classifier never trained on) is cut in three: the STRIP bank
(shipped), and two halves of the rest. Every threshold is set at the target false-positive rate on clean
images, by running the exported bundle through the service's own pipeline (service.guard):
- STRIP: a normal fitted to clean entropies, threshold at its `target_fpr` percentile (Gao et al.);
- masked AE and activation score: the empirical (1 - target_fpr) quantile of clean scores;
- de-trigger AE: Kwon's rule (label changes) has no threshold; its clean flag rate is recorded;
- fused: per-signal percentile tables from half A, threshold at the (1 - target_fpr) quantile of half
  B's fused scores, so that the threshold is not fitted on the images that built the tables.
Neural Cleanse's reversed triggers (what a defender can compute) serve as stand-in attacks: their
detection rates are recorded as a sanity check and never move a threshold. The real trigger is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

from service.bundle import Bundle, build_pipeline
from service.guard import Fusion, GuardPipeline, SignalResult

# Percentile levels of the fusion tables; above the last one an exponential tail takes over (service.guard.Fusion).
FUSION_LEVELS = np.linspace(0.0, 0.9, 91)


@dataclass(frozen=True)
class CalibrationConfig:
    target_fpr: float = 0.01  # false-positive rate on clean images every threshold is set at
    strip_n: int = 32  # STRIP overlays per input (paper: 100; 10 enough on GTSRB), calibrated at this N
    strip_blend: Literal["sum", "mean"] = "sum"  # sum: STRIP's original code; mean: ART's 0.5/0.5
    bank_size: int = 256  # clean images shipped for STRIP (the first strip_n are the overlays)
    seed: int = 0  # which calibration images go to the bank and to each half


def split_calibration(n: int, config: CalibrationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of (bank, half A, half B) within the calibration split."""
    if config.bank_size >= n - 2:
        raise ValueError(f"bank_size {config.bank_size} leaves no calibration images out of {n}")
    order = np.random.default_rng(config.seed).permutation(n)
    bank, rest = order[: config.bank_size], order[config.bank_size :]
    half = len(rest) // 2
    return bank, rest[:half], rest[half:]


def collect(pipeline: GuardPipeline, images: np.ndarray) -> dict[str, SignalResult]:
    """Run the guard over many images and join the per-signal results."""
    runs = pipeline.run_chunked(images)
    return {
        name: SignalResult(
            score=np.concatenate([r.signals[name].score for r in runs]),
            triggered=np.concatenate([r.signals[name].triggered for r in runs]),
        )
        for name in runs[0].signals
    }


def strip_threshold(entropies: np.ndarray, fpr: float) -> tuple[float, float, float]:
    """Gao et al.: fit a normal to clean entropies; the threshold is its `fpr` percentile. (thr, mean, std)"""
    mean, std = float(entropies.mean()), float(entropies.std(ddof=1))
    return mean + std * NormalDist().inv_cdf(fpr), mean, std


def tail_scale_of(scores: np.ndarray, start: float) -> float:
    """Mean excess of the scores above `start`: the exponential tail's scale (floored, never zero)."""
    excess = scores[scores > start] - start
    spread = float(np.ptp(scores)) or 1.0
    return max(float(excess.mean()) if len(excess) else 0.0, 1e-6 * spread)


def fit_thresholds(
    half_a: dict[str, SignalResult], half_b: dict[str, SignalResult], config: CalibrationConfig
) -> dict[str, Any]:
    """Every threshold from the clean scores of two disjoint halves (see module doc)."""
    fpr = config.target_fpr
    both = {k: np.concatenate([half_a[k].score, half_b[k].score]) for k in half_a}
    entropy = -both["strip"]
    strip_thr, mean, std = strip_threshold(entropy, fpr)
    quantiles = {k: np.quantile(half_a[k].score, FUSION_LEVELS) for k in half_a}
    tail_scale = {k: tail_scale_of(half_a[k].score, quantiles[k][-1]) for k in half_a}
    fusion = Fusion(FUSION_LEVELS, quantiles, tail_scale, threshold=1.0)
    fused_b = fusion.score(half_b)
    fused_threshold = float(np.quantile(fused_b, 1 - fpr))
    masked = float(np.quantile(both["masked_ae"], 1 - fpr))
    activation = float(np.quantile(both["activation"], 1 - fpr))
    return {
        "target_fpr": fpr,
        "detrigger": {
            "rule": "label_change",
            "calibration_fpr": float(
                np.mean(np.concatenate([half_a["detrigger"].triggered, half_b["detrigger"].triggered]))
            ),
        },
        "masked_ae": {"threshold": masked, "calibration_fpr": float(np.mean(both["masked_ae"] > masked))},
        "strip": {
            "threshold": strip_thr,
            "entropy_mean": mean,
            "entropy_std": std,
            "n": config.strip_n,
            "blend": config.strip_blend,
            "calibration_fpr": float(np.mean(entropy <= strip_thr)),
        },
        "activation": {
            "threshold": activation,
            "calibration_fpr": float(np.mean(both["activation"] > activation)),
        },
        "fused": {
            "threshold": fused_threshold,
            "calibration_fpr": float(np.mean(fused_b > fused_threshold)),
            "levels": FUSION_LEVELS.round(6).tolist(),
            "quantiles": {k: v.tolist() for k, v in quantiles.items()},
            "tail_scale": tail_scale,
        },
    }


def calibrate(
    bundle: Bundle, images: np.ndarray, labels: np.ndarray, config: CalibrationConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """images: the calibration split, float32 (N, 1, H, W). Returns (thresholds, stand-in attack rates)."""
    _, idx_a, idx_b = split_calibration(len(images), config)
    raw = build_pipeline(bundle, strip_n=config.strip_n, calibrated=False)
    thresholds = fit_thresholds(collect(raw, images[idx_a]), collect(raw, images[idx_b]), config)
    # Stand-in attacks: Neural Cleanse's reversed trigger of each watched label on half B's other labels.
    bundle.manifest["thresholds"] = thresholds
    guard = build_pipeline(bundle, strip_n=config.strip_n)
    stand_in = {}
    for label in map(int, bundle.manifest["neural_cleanse"]["activation_neurons"]):
        victims = idx_b[labels[idx_b] != label]
        stamped = bundle.stamp_reversed(images[victims], label)
        runs = guard.run_chunked(stamped)
        stand_in[str(label)] = {
            "images": len(victims),
            "fused_tpr": float(np.mean(np.concatenate([r.backdoor for r in runs]))),
            **{
                f"{name}_tpr": float(np.mean(np.concatenate([r.signals[name].triggered for r in runs])))
                for name in runs[0].signals
            },
        }
    return thresholds, {"neural_cleanse_reversed_triggers": stand_in}
