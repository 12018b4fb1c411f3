"""Measure a bundle with ONNX Runtime through the service's own pipeline: the one set of metric functions.

Used at export (the manifest's `metrics`), by the tests (on a subset), by the evaluation report
(`python -m training.evaluate`) and its STRIP sweep.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.bundle import Bundle, build_pipeline
from service.guard import Blend, GuardResult, Prediction, StripSignal
from service.signals.strip import strip_threshold
from training.attacks import AttackConfig, ProbeTrigger, attack_labels, victims

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TriggeredSet:
    images: np.ndarray  # float32 (M, 1, H, W): victims with the trigger stamped
    true_labels: np.ndarray  # (M,)
    attack_labels: np.ndarray  # (M,) what the attacker wants them classified as


def triggered_set(images: np.ndarray, labels: np.ndarray, attack: AttackConfig, num_classes: int) -> TriggeredSet:
    """Stamp the attack's trigger on every image it should flip (single-target: the non-target ones)."""
    idx = victims(labels, attack)
    return TriggeredSet(attack.trigger.apply(images[idx]), labels[idx], attack_labels(labels[idx], attack, num_classes))


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties count half (Mann-Whitney U)."""
    scores = np.concatenate([negatives, positives])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    n_neg, n_pos = len(negatives), len(positives)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_neg * n_pos))


def _join(runs: list[GuardResult]) -> dict[str, np.ndarray]:
    """Flatten chunked guard results into the arrays the metrics need."""
    out = {
        "original": np.concatenate([r.original.labels for r in runs]),
        "restored": np.concatenate([r.restored.labels for r in runs]),
        "final": np.concatenate([r.labels for r in runs]),
        "plain": np.concatenate([np.where(r.backdoor, r.restored.labels, r.original.labels) for r in runs]),
        "backdoor": np.concatenate([r.backdoor for r in runs]),
        "score": np.concatenate([r.score for r in runs]),
    }
    for name in runs[0].signals:
        out[f"{name}.score"] = np.concatenate([r.signals[name].score for r in runs])
        out[f"{name}.triggered"] = np.concatenate([r.signals[name].triggered for r in runs])
        for key in runs[0].signals[name].evidence:
            out[f"{name}.{key}"] = np.concatenate([r.signals[name].evidence[key] for r in runs])
    return out


def pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}%"


def rate(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


@dataclass
class Outcome:
    """Everything the guard said about a clean set and its triggered victims, flattened."""

    clean: dict[str, np.ndarray]
    triggered: dict[str, np.ndarray]
    labels: np.ndarray  # (N,) true labels of the clean images
    trig: TriggeredSet
    signals: list[str]


def outcome_of(
    bundle: Bundle, clean: np.ndarray, labels: np.ndarray, trig: TriggeredSet, strip_n: int | None = None
) -> Outcome:
    """Run the guard over clean model inputs (float32 (N, 1, H, W)) with their labels and a triggered set; every
    STRIP overlay on every image, so that STRIP's own figures are exact (its early exit keeps the verdicts)."""
    guard = build_pipeline(bundle, strip_n=strip_n, early_exit=False)
    clean_run, dirty_run = _join(guard.run_chunked(clean)), _join(guard.run_chunked(trig.images))
    return Outcome(clean_run, dirty_run, labels, trig, [s.name for s in guard.signals])


def guard_outcome(
    bundle: Bundle, images: np.ndarray, labels: np.ndarray, attack: AttackConfig, strip_n: int | None = None
) -> Outcome:
    return outcome_of(bundle, images, labels, triggered_set(images, labels, attack, len(bundle.class_names)), strip_n)


def metrics_of(o: Outcome) -> dict[str, Any]:
    """Per-signal and fused figures of an outcome."""
    clean, dirty, y, yt, ya = o.clean, o.triggered, o.labels, o.trig.true_labels, o.trig.attack_labels
    metrics: dict[str, Any] = {
        "images": {"clean": len(y), "triggered": len(yt)},
        "classifier": {
            "clean_accuracy": rate(clean["original"] == y),
            "attack_success": rate(dirty["original"] == ya),
            "triggered_accuracy": rate(dirty["original"] == yt),
        },
    }
    for key in o.signals:
        entry = {
            "fpr": rate(clean[f"{key}.triggered"]),
            "tpr": rate(dirty[f"{key}.triggered"]),
            "auroc": auroc(clean[f"{key}.score"], dirty[f"{key}.score"]),
        }
        if f"{key}.label" in clean:  # restoration signals: what restoration alone does to accuracy
            entry["clean_accuracy_after"] = rate(clean[f"{key}.label"] == y)
            entry["triggered_accuracy_after"] = rate(dirty[f"{key}.label"] == yt)
            entry["attack_success_after"] = rate(dirty[f"{key}.label"] == ya)
        metrics[key] = entry
    metrics["fused"] = {
        "fpr": rate(clean["backdoor"]),
        "tpr": rate(dirty["backdoor"]),
        "auroc": auroc(clean["score"], dirty["score"]),
        "clean_accuracy": rate(clean["final"] == y),
        "triggered_accuracy": rate(dirty["final"] == yt),
        "attack_success_after": rate(dirty["final"] == ya),
        # the same with the plain policy (restored label even when Neural Cleanse flagged it as infected)
        "attack_success_after_plain_policy": rate(dirty["plain"] == ya),
        "triggered_accuracy_plain_policy": rate(dirty["plain"] == yt),
        "clean_accuracy_plain_policy": rate(clean["plain"] == y),
    }
    return metrics


def evaluate(
    bundle: Bundle, images: np.ndarray, labels: np.ndarray, attack: AttackConfig, strip_n: int | None = None
) -> dict[str, Any]:
    """Every per-signal and fused figure on clean `images` and their triggered victims."""
    return metrics_of(guard_outcome(bundle, images, labels, attack, strip_n))


def defender_metrics(
    bundle: Bundle, images: np.ndarray, labels: np.ndarray, probe: ProbeTrigger | None = None
) -> dict[str, Any]:
    """What a defender can know about a model someone else trained, on their own clean test images: the clean
    accuracy, every signal's false-positive rate and the fused one, Neural Cleanse's reversed triggers as stand-in
    attacks (each watched label's trigger on the images of the other labels), and a trigger the user knows
    (`probe`). Nothing about our demo attack: the user's model was not trained with it."""
    guard = build_pipeline(bundle, early_exit=False)  # exact per-signal figures
    clean = _join(guard.run_chunked(images))
    names = [s.name for s in guard.signals]

    def attack(stamped: np.ndarray, true: np.ndarray, target: int) -> dict[str, Any]:
        trig = TriggeredSet(stamped, true, np.full(len(true), target))
        figures = metrics_of(Outcome(clean, _join(guard.run_chunked(stamped)), labels, trig, names))
        keep = ("images", "classifier", "fused", *names)
        return {"target": target, **{k: v for k, v in figures.items() if k in keep}}

    stand_ins = {}
    for label in map(int, bundle.manifest["neural_cleanse"]["activation_neurons"]):
        idx = np.flatnonzero(labels != label)
        stand_ins[str(label)] = attack(bundle.stamp_reversed(images[idx], label), labels[idx], label)
    probed = None
    if probe is not None:
        target = probe.target
        if target is None:  # the label the trigger pushes to: what the model says most often when it is wrong
            said = bundle.classify(probe.apply(images))[0].argmax(1)
            pushed = said[said != labels]
            target = int(np.bincount(pushed).argmax()) if len(pushed) else int(np.bincount(said).argmax())
        idx = np.flatnonzero(labels != target)
        probed = {"name": probe.name, **attack(probe.apply(images[idx]), labels[idx], target)}
    return {
        "kind": "defender",  # a user's model: no attack of ours to measure (report.render_defender)
        "images": {"clean": len(labels)},
        "classifier": {"clean_accuracy": rate(clean["original"] == labels)},
        **{name: {"fpr": rate(clean[f"{name}.triggered"])} for name in names},
        "fused": {"fpr": rate(clean["backdoor"]), "clean_accuracy": rate(clean["final"] == labels)},
        "stand_ins": stand_ins,
        "probe": probed,
    }


def strip_entropies(
    bundle: Bundle, images: np.ndarray, n: int, chunk: int = 64, blend: Blend | None = None
) -> tuple[np.ndarray, float]:
    """STRIP alone at N overlays (blended as the bundle's STRIP does, or as `blend` says): (entropies (M,),
    seconds per image spent blending and classifying)."""
    blend = blend or bundle.manifest["configs"]["strip"]["blend"]
    signal = StripSignal(bundle.strip_bank, n, blend, threshold=None)
    out, seconds = [], 0.0
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk]
        start = time.perf_counter()
        overlays = signal.prepare(x)
        logits, features = bundle.classify(overlays)
        seconds += time.perf_counter() - start
        pred = Prediction(logits, features)
        out.append(signal.evaluate(x, overlays, pred, pred).evidence["entropy"])
    return np.concatenate(out), seconds / len(images)


def strip_alone(
    bundle: Bundle, calibration: np.ndarray, clean: np.ndarray, triggered: np.ndarray, n: int, fpr: float
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """STRIP on its own at N overlays, thresholded as the paper does (a normal fitted to the clean calibration
    entropies, its `fpr` percentile), whether or not the bundle's signals include it: (figures, clean entropies,
    triggered entropies)."""
    cal_entropy, _ = strip_entropies(bundle, calibration, n)
    threshold, _, _ = strip_threshold(cal_entropy, fpr)
    clean_entropy, cost = strip_entropies(bundle, clean, n)
    trig_entropy, _ = strip_entropies(bundle, triggered, n)
    row = {
        "n": n,
        "threshold": threshold,
        "fpr": rate(clean_entropy <= threshold),
        "tpr": rate(trig_entropy <= threshold),
        "auroc": auroc(-clean_entropy, -trig_entropy),
        "ms_per_image": 1000 * cost,
    }
    return row, clean_entropy, trig_entropy


def strip_sweep(
    bundle: Bundle, calibration: np.ndarray, clean: np.ndarray, triggered: np.ndarray, ns: tuple[int, ...], fpr: float
) -> list[dict[str, float]]:
    """STRIP's detection and cost versus N, each N with its own threshold calibrated as the paper does."""
    rows = []
    for n in ns:
        rows.append(strip_alone(bundle, calibration, clean, triggered, n, fpr)[0])
        log.info("STRIP N=%d: %s", n, rows[-1])
    return rows
