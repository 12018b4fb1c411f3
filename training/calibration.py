"""Stages 7-8: the STRIP bank and the thresholds, from clean calibration data only.

The calibration split (5,000 images the classifier never trained on) is cut in four: the STRIP bank
(shipped), the repair share (the repair stage fine-tunes on it and the bank), and two halves of the rest,
which no model was trained on. Neural Cleanse is the exception: its reversed triggers, and the activation
signal's neurons they pick, are optimised over the whole split, halves included (training.neural_cleanse; a
defender's computation, no label of the attack). Every threshold is set at the target false-positive rate on
clean images, by running the exported bundle through the service's own pipeline (service.guard); each signal fits
its own (service.signals: `Signal.fit`) on both halves:
- STRIP: a normal fitted to clean entropies, threshold at its `target_fpr` percentile (Gao et al.);
- masked AE, activation, squeeze, repaired: the empirical (1 - target_fpr) quantile of clean scores;
- de-trigger AE: Kwon's rule (label changes) has no threshold; its clean flag rate is recorded;
- fused: per-signal percentile tables from half A, combined by `fusion` (Fisher's sum of clean-tail
  surprises; service.guard.Fusion), threshold at the (1 - target_fpr) quantile of half B's fused scores,
  so that the threshold is not fitted on the images that built the tables.
Neural Cleanse's reversed triggers (what a defender can compute) serve as stand-in attacks: their
detection rates are recorded as a sanity check and never move a threshold. The real trigger is not used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

import numpy as np

from service.bundle import Bundle, build_pipeline
from service.guard import SOURCES, Fusion, GuardPipeline, GuardResult, SignalResult
from service.signals import REGISTRY

log = logging.getLogger(__name__)

# Percentile levels of the fusion tables; above the last one an exponential tail takes over (service.guard.Fusion).
# Rounded as the manifest records them, so that half B is scored with the very levels the service loads.
FUSION_LEVELS = np.linspace(0.0, 0.9, 91).round(6)
# Fewer clean images of half B than this above the fused threshold (len(half B) x target FPR) and the FPR the
# threshold gives on other clean images scatters widely: calibration says so, loudly, and records the count.
FEW_ABOVE = 10


@dataclass(frozen=True)
class CalibrationConfig:
    target_fpr: float = 0.01  # false-positive rate on clean images every threshold is set at
    # STRIP overlays per input (paper: 100; 10 enough on GTSRB), calibrated at this N. 4: the cheapest N within
    # 0.5 point of N = 32's fused TPR and FPR on every suite attack (8 classifier passes per image instead of 36;
    # `make cost`, reports/cost.md, after the repair and expert of commit bcb0ee6 made STRIP matter less; with
    # the signals before it, the cheapest was 16).
    strip_n: int = 4
    strip_blend: Literal["sum", "mean"] = "sum"  # sum: STRIP's original code; mean: ART's 0.5/0.5
    bank_size: int = 256  # clean images shipped for STRIP (the first strip_n are the overlays)
    repair_share: float = 0.3  # share of the calibration split the repair stage fine-tunes on (with the bank)
    seed: int = 0  # which calibration images go to the bank, the repair share and each half
    # How the fused verdict combines the signals (service.guard.RULES). make evaluate measures every rule on every
    # suite attack (reports/attack_suite.json: fusion_rules; the table in reports/evaluation.md).
    fusion: Literal["max", "fisher"] = "fisher"
    # Where a flagged image's label comes from (service.guard.SOURCES) when the bundle has a repaired model: "both"
    # (the restored and repaired predictions averaged), or "best": whichever gives Neural Cleanse's stand-in
    # triggered images their true label most often. "best" picked the repaired model for all-to-all on its
    # stand-ins, where that model still obeys the trigger. make cost (reports/cost.md, on the half of the test set
    # the suite does not report on) weighs each source under every suite bundle's verdicts: "both" ties the others'
    # worst attacker's label (4.29%, the low-contrast patch's unflagged images, which no source touches) with the
    # highest mean true label (85.12%, against 82.85% repaired and 64.56% restored; all-to-all's attacker's label
    # 0.46% against 1.08% with the repaired model).
    label_source: Literal["both", "best"] = "both"

    def __post_init__(self) -> None:
        """The choices its type names, checked: the config also comes from JSON (a manifest's configs, a user's
        file), where any other value would silently take the other branch."""
        for name, hint in get_type_hints(CalibrationConfig).items():
            if get_origin(hint) is Literal and getattr(self, name) not in (allowed := get_args(hint)):
                raise ValueError(f"calibration {name} {getattr(self, name)!r}: choose from {list(allowed)}")
        if not 0 < self.target_fpr < 1:
            raise ValueError(f"calibration target_fpr {self.target_fpr!r} must lie in (0, 1)")
        if not 0 <= self.repair_share < 1:
            raise ValueError(f"calibration repair_share {self.repair_share!r} must lie in [0, 1)")


def _leaves_halves(n: int, config: CalibrationConfig) -> bool:
    """Whether n calibration images leave images for the two halves once the bank and the repair share are out."""
    return config.bank_size + int(config.repair_share * n) < n - 2


def _order(n: int, config: CalibrationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bank, repair share, rest) of a seeded permutation of range(n)."""
    n_repair = int(config.repair_share * n)
    if not _leaves_halves(n, config):
        raise ValueError(f"bank_size {config.bank_size} and repair_share {config.repair_share} leave no "
                         f"calibration images out of {n}")  # fmt: skip
    order = np.random.default_rng(config.seed).permutation(n)
    cut = config.bank_size + n_repair
    return order[: config.bank_size], order[config.bank_size : cut], order[cut:]


def min_calibration_images(config: CalibrationConfig) -> int:
    """The fewest calibration images `_order` accepts under `config` (the bank, the repair share, two halves)."""
    n = config.bank_size + 3
    while not _leaves_halves(n, config):
        n += 1
    return n


def split_calibration(n: int, config: CalibrationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of (bank, half A, half B) within the calibration split; no model is trained on either half (Neural
    Cleanse's optimisation sees them: module doc)."""
    bank, _, rest = _order(n, config)
    half = len(rest) // 2
    return bank, rest[:half], rest[half:]


def repair_indices(n: int, config: CalibrationConfig) -> np.ndarray:
    """The calibration images the repair stage may fine-tune on: the STRIP bank and the repair share."""
    bank, repair, _ = _order(n, config)
    return np.concatenate([bank, repair])


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


def tail_scale_of(scores: np.ndarray, start: float) -> float:
    """Mean excess of the scores above `start`: the exponential tail's scale (floored, never zero)."""
    excess = scores[scores > start] - start
    spread = float(np.ptp(scores)) or 1.0
    return max(float(excess.mean()) if len(excess) else 0.0, 1e-6 * spread)


def fit_fusion(half_a: dict[str, np.ndarray], rule: str) -> Fusion:
    """The fusion's tables from clean scores (signal -> scores of calibration half A); its threshold is left at
    1.0 for the caller to fit on half B."""
    quantiles = {k: np.quantile(v, FUSION_LEVELS) for k, v in half_a.items()}
    tail_scale = {k: tail_scale_of(v, quantiles[k][-1]) for k, v in half_a.items()}
    return Fusion(FUSION_LEVELS, quantiles, tail_scale, threshold=1.0, rule=rule)


def fit_thresholds(
    half_a: dict[str, SignalResult], half_b: dict[str, SignalResult], config: CalibrationConfig
) -> dict[str, Any]:
    """Every threshold from the clean scores of two disjoint halves (see module doc)."""
    fpr = config.target_fpr
    both = {
        k: SignalResult(np.concatenate([half_a[k].score, half_b[k].score]),
                        np.concatenate([half_a[k].triggered, half_b[k].triggered]))
        for k in half_a
    }  # fmt: skip
    own = {name: REGISTRY[name].fit(results, fpr) for name, results in both.items()}
    fusion = fit_fusion({k: r.score for k, r in half_a.items()}, config.fusion)
    fused_b = fusion.score(half_b)
    fused_threshold = float(np.quantile(fused_b, 1 - fpr))
    if (above := len(fused_b) * fpr) < FEW_ABOVE:
        log.warning(
            "the fused threshold rests on %.1f clean images above it (%d in calibration half B at a target FPR of "
            "%g): the FPR it gives on other clean images will scatter far from the target; give more calibration "
            "images (DataConfig.calibration_size) or a larger target FPR", above, len(fused_b), fpr,
        )  # fmt: skip
    if fused_threshold >= 1 - 1e-12:  # float64 rounds fused scores past this to 1.0: nothing could exceed it
        raise ValueError(
            f"the fused threshold {fused_threshold!r} is too close to 1 to be exceeded: the clean calibration scores "
            "are that far into their own tails, so the signals' tables do not describe clean data"
        )
    return {
        "target_fpr": fpr,
        **own,
        "fused": {
            "threshold": fused_threshold,
            "calibration_fpr": float(np.mean(fused_b > fused_threshold)),
            "calibration_images": len(fused_b),
            "rule": config.fusion,
            "levels": FUSION_LEVELS.tolist(),
            "quantiles": {k: np.asarray(v).tolist() for k, v in fusion.quantiles.items()},
            "tail_scale": dict(fusion.tail_scale),
        },
    }


def calibrate(
    bundle: Bundle, images: np.ndarray, labels: np.ndarray, config: CalibrationConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """images: the calibration split, float32 (N, 1, H, W). Returns (thresholds, stand-in attack rates)."""
    _, idx_a, idx_b = split_calibration(len(images), config)
    raw = build_pipeline(bundle, strip_n=config.strip_n, calibrated=False)
    thresholds = fit_thresholds(collect(raw, images[idx_a]), collect(raw, images[idx_b]), config)
    for signal in raw.signals:  # what each threshold was fitted to (the manifest check refuses another)
        thresholds[signal.name].update(signal.calibrated_with())
    # Stand-in attacks: Neural Cleanse's reversed trigger of each watched label on half B's other labels.
    bundle.manifest["thresholds"] = thresholds
    guard = build_pipeline(bundle, strip_n=config.strip_n, early_exit=False)
    stand_in = {}
    sources: dict[str, list[np.ndarray]] = {}
    for label in map(int, bundle.manifest["neural_cleanse"]["activation_neurons"]):
        victims = idx_b[labels[idx_b] != label]
        stamped = bundle.stamp_reversed(images[victims], label)
        runs = guard.run_chunked(stamped)
        run = GuardResult.concat(runs)
        flagged = np.ones(len(victims), bool)  # every stand-in as if flagged: which source gives the true label
        for source in run.sources():
            sources.setdefault(source, []).append(run.labels_from(source, flagged, guard.infected) == labels[victims])
        stand_in[str(label)] = {
            "images": len(victims),
            "fused_tpr": float(np.mean(np.concatenate([r.backdoor for r in runs]))),
            **{
                f"{name}_tpr": float(np.mean(np.concatenate([r.signals[name].triggered for r in runs])))
                for name in runs[0].signals
            },
        }
    # The label source for flagged images: "both" (config.label_source), or the one that gives the stand-in triggered
    # images their true label most often (ties go to the first of SOURCES); the stand-in accuracies are recorded
    # either way. A defender's measurement: the attacker's trigger is not used.
    accuracy = {source: float(np.concatenate(hits).mean()) for source, hits in sources.items()}
    best = max(accuracy, key=lambda s: (accuracy[s], -SOURCES.index(s))) if accuracy else "restored"
    if config.label_source == "both" and "both" in accuracy:
        best = "both"
    thresholds["label_source"] = {"source": best, "rule": config.label_source, "stand_in_accuracy": accuracy}
    return thresholds, {"neural_cleanse_reversed_triggers": stand_in}
