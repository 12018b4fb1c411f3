"""The guard pipeline, torch-free: classify -> restore -> signals -> fused verdict, on numpy batches.

Every signal has the same two-step interface so that all classifier passes of a batch (the input, both
restorations, STRIP's N overlays) run as one ONNX Runtime call:
  prepare(x)  -> the extra images it needs classified, float32 (k * B, 1, H, W)
  evaluate(x, extra, original, extra_pred) -> SignalResult: a score (higher = more suspicious), its own
  verdict, and per-image evidence.
The fused verdict ranks each score against the clean calibration distribution (an empirical CDF stored
in the manifest) and takes the largest rank: "how far into the clean tail is the most alarmed signal".
A score that is not finite fails the batch (NonFiniteScore; the service's 500 guard_failed) rather than pass
as clean: the guard fails closed.
Calibration (training/calibration.py), evaluation and the service all run this same code.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

Classify = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # images -> (logits, features)
ImageModel = Callable[[np.ndarray], np.ndarray]  # images -> restored images
Blend = Literal["sum", "mean"]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def entropy_bits(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits over the last axis, with 0 log 0 = 0."""
    p = np.clip(probs, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p), 0.0)
    return -terms.sum(axis=-1)


def superimpose(images: np.ndarray, overlays: np.ndarray, blend: Blend = "sum") -> np.ndarray:
    """(B, 1, H, W) x (N, 1, H, W) -> (B * N, 1, H, W), image-major.

    "sum" is STRIP's original code (x + overlay, no clipping); "mean" is ART's 0.5 x + 0.5 overlay.
    """
    mixed = images[:, None] + overlays[None]  # (B, N, 1, H, W)
    if blend == "mean":
        mixed = mixed * np.float32(0.5)
    return mixed.reshape(-1, *images.shape[1:]).astype(np.float32, copy=False)


def strip_entropy(probs: np.ndarray, n: int) -> np.ndarray:
    """(B * N, C) predictions of the overlays -> (B,) mean per-copy entropy (Gao et al., log2)."""
    return entropy_bits(probs).reshape(-1, n).mean(axis=1)


@dataclass(frozen=True)
class Prediction:
    logits: np.ndarray  # (B, C)
    features: np.ndarray  # (B, D), penultimate layer

    @property
    def probs(self) -> np.ndarray:
        return softmax(self.logits)

    @property
    def labels(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1)

    def take(self, sl: slice) -> Prediction:
        return Prediction(self.logits[sl], self.features[sl])


@dataclass
class SignalResult:
    score: np.ndarray  # (B,) higher = more suspicious
    triggered: np.ndarray  # (B,) bool, this signal's own verdict
    evidence: dict[str, np.ndarray] = field(default_factory=dict)  # per-image values for the response
    images: np.ndarray | None = None  # restored images, for restoration signals

    def take(self, sl: slice) -> SignalResult:
        images = self.images[sl] if self.images is not None else None
        return SignalResult(self.score[sl], self.triggered[sl], {k: v[sl] for k, v in self.evidence.items()}, images)


class Signal(ABC):
    name: ClassVar[str]
    threshold: float | None = None  # on the signal's own evidence (see `report`); None before calibration

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Extra images this signal needs classified; none by default."""
        return x[:0]

    @abstractmethod
    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        """Score a batch from the original prediction and the prediction of `extra`."""

    def report(self, result: SignalResult, i: int) -> dict[str, Any]:
        """Image i's evidence as JSON values: its own verdict, the evidence arrays, the threshold."""
        out: dict[str, Any] = {"triggered": bool(result.triggered[i])}
        out.update({k: v[i].item() for k, v in result.evidence.items()})
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out


def _confidence_drop(original: Prediction, restored: Prediction) -> np.ndarray:
    """How much restoration lowers the probability of the originally predicted label, in [-1, 1]."""
    rows = np.arange(len(original.logits))
    return original.probs[rows, original.labels] - restored.probs[rows, original.labels]


class DetriggerSignal(Signal):
    """Kwon's flag rule: restore with the de-trigger AE; labels before and after differ -> backdoor."""

    name = "detrigger"

    def __init__(self, restore: ImageModel) -> None:
        self.restore = restore

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return self.restore(x)

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        return SignalResult(
            score=_confidence_drop(original, pred),
            triggered=pred.labels != original.labels,
            evidence={"label": pred.labels, "confidence": pred.confidence},
            images=extra,
        )


class MaskedAESignal(Signal):
    """Cao's masked-AE restoration: a calibrated drop in the original label's confidence -> backdoor."""

    name = "masked_ae"

    def __init__(self, restore: ImageModel, threshold: float | None) -> None:
        self.restore = restore
        self.threshold = threshold

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return self.restore(x)

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        score = _confidence_drop(original, pred)
        return SignalResult(
            score=score,
            triggered=_above(score, self.threshold),
            evidence={"label": pred.labels, "confidence": pred.confidence, "score": score},
            images=extra,
        )


class StripSignal(Signal):
    """STRIP: superimpose N clean bank images; a trigger keeps every copy on its label -> low entropy."""

    name = "strip"

    def __init__(self, bank: np.ndarray, n: int, blend: Blend, threshold: float | None) -> None:
        if not 1 <= n <= len(bank):
            raise ValueError(f"STRIP n must be in [1, {len(bank)}] (the bank's size), got {n}")
        self.overlays = np.ascontiguousarray(bank[:n], dtype=np.float32)
        self.n, self.blend, self.threshold = n, blend, threshold

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return superimpose(x, self.overlays, self.blend)

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        entropy = strip_entropy(pred.probs, self.n)
        below = entropy <= self.threshold if self.threshold is not None else np.zeros(len(x), bool)
        return SignalResult(score=-entropy, triggered=below, evidence={"entropy": entropy})

    def report(self, result: SignalResult, i: int) -> dict[str, Any]:
        return {**super().report(result, i), "n": self.n}


class ActivationSignal(Signal):
    """Neural Cleanse's filter: mean activation of the neurons its reversed trigger excites most."""

    name = "activation"

    def __init__(self, neurons: Mapping[int, Sequence[int]], threshold: float | None) -> None:
        if not neurons:
            raise ValueError("the activation filter needs at least one label's neurons")
        self.neurons = {int(t): np.asarray(idx, dtype=np.int64) for t, idx in neurons.items()}
        self.threshold = threshold

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        per_label = np.stack([original.features[:, idx].mean(axis=1) for idx in self.neurons.values()])
        score = per_label.max(axis=0)
        return SignalResult(score=score, triggered=_above(score, self.threshold), evidence={"score": score})


def _above(score: np.ndarray, threshold: float | None) -> np.ndarray:
    return score > threshold if threshold is not None else np.zeros(score.shape, bool)


@dataclass(frozen=True)
class Fusion:
    """Largest clean-calibration percentile over signals; backdoor when it exceeds `threshold`.

    A signal's percentile is its clean calibration CDF: the empirical table up to `levels[-1]` (the 90th
    percentile), and above it an exponential tail fitted to the clean scores that exceed it (peaks over
    threshold): 1 - (1 - levels[-1]) * exp(-(score - q) / scale). The tail keeps the ordering beyond the
    largest calibration score, so that a few hundred calibration images still give a threshold that can
    fire (an empirical CDF alone puts everything past its maximum at exactly 1.0, a tie).
    """

    levels: np.ndarray  # (Q,) increasing probabilities in [0, levels[-1]]
    quantiles: Mapping[str, np.ndarray]  # signal -> (Q,) clean calibration scores at those levels
    tail_scale: Mapping[str, float]  # signal -> mean excess of clean scores over the table's last quantile
    threshold: float

    def percentile(self, name: str, score: np.ndarray) -> np.ndarray:
        table, top = self.quantiles[name], float(self.levels[-1])
        body = np.interp(score, table, self.levels, left=0.0)
        excess = np.maximum(score - table[-1], 0.0) / self.tail_scale[name]
        return np.where(score > table[-1], 1.0 - (1.0 - top) * np.exp(-excess), body)

    def score(self, results: Mapping[str, SignalResult]) -> np.ndarray:
        return np.max([self.percentile(name, results[name].score) for name in self.quantiles], axis=0)

    @classmethod
    def from_manifest(cls, fused: Mapping[str, Any]) -> Fusion:
        return cls(
            levels=np.asarray(fused["levels"], np.float64),
            quantiles={k: np.asarray(v, np.float64) for k, v in fused["quantiles"].items()},
            tail_scale={k: float(v) for k, v in fused["tail_scale"].items()},
            threshold=float(fused["threshold"]),
        )


@dataclass
class GuardResult:
    original: Prediction
    restored: Prediction  # after the de-trigger AE
    restored_images: np.ndarray  # (B, 1, H, W)
    signals: dict[str, SignalResult]
    score: np.ndarray  # (B,) fused score, NaN without a calibrated fusion
    backdoor: np.ndarray  # (B,) bool
    labels: np.ndarray  # (B,) the label to trust (see `trusted_labels`)
    confidence: np.ndarray  # (B,) its probability

    def take(self, sl: slice) -> GuardResult:
        """The results of images sl of the batch (micro-batching hands each request its own)."""
        return GuardResult(
            self.original.take(sl),
            self.restored.take(sl),
            self.restored_images[sl],
            {k: v.take(sl) for k, v in self.signals.items()},
            self.score[sl],
            self.backdoor[sl],
            self.labels[sl],
            self.confidence[sl],
        )

    @staticmethod
    def concat(parts: Sequence[GuardResult]) -> GuardResult:
        """The results of consecutive chunks of a batch as one (the inverse of `take`)."""
        if len(parts) == 1:
            return parts[0]
        cat = np.concatenate

        def prediction(ps: Sequence[Prediction]) -> Prediction:
            return Prediction(cat([p.logits for p in ps]), cat([p.features for p in ps]))

        def signal(rs: Sequence[SignalResult]) -> SignalResult:
            images = None if rs[0].images is None else cat([r.images for r in rs if r.images is not None])
            evidence = {k: cat([r.evidence[k] for r in rs]) for k in rs[0].evidence}
            return SignalResult(cat([r.score for r in rs]), cat([r.triggered for r in rs]), evidence, images)

        first = parts[0]
        return GuardResult(
            prediction([p.original for p in parts]),
            prediction([p.restored for p in parts]),
            cat([p.restored_images for p in parts]),
            {name: signal([p.signals[name] for p in parts]) for name in first.signals},
            cat([p.score for p in parts]),
            cat([p.backdoor for p in parts]),
            cat([p.labels for p in parts]),
            cat([p.confidence for p in parts]),
        )


def trusted_labels(
    original: Prediction, restored: Prediction, backdoor: np.ndarray, infected: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Label policy: the original prediction, or for a suspected backdoor the de-triggered one.

    A suspected image is never given a label Neural Cleanse found infected: the attacker's label is the
    one answer a flagged input must not get, even when restoration alone leaves it on top (on the shipped
    bundle that happens mostly to shirts the model calls T-shirts without any trigger).
    """
    probs = restored.probs
    if infected:
        probs = probs.copy()
        probs[:, list(infected)] = -1.0
    rows = np.arange(len(backdoor))
    suspect = probs.argmax(axis=1)
    labels = np.where(backdoor, suspect, original.labels)
    confidence = np.where(backdoor, restored.probs[rows, suspect], original.confidence)
    return labels, confidence


class NonFiniteScore(ValueError):
    """A signal could not score an image. The service answers 500 guard_failed (service.errors.GuardFailure);
    defined here, free of FastAPI, because training runs this module without the serve extra."""


def fail_closed(scores: Mapping[str, np.ndarray]) -> None:
    """Raise NonFiniteScore when any image has a non-finite score: NaN compares false with every threshold, so
    an image a signal could not score would otherwise come back clean, with the attacker's label."""
    bad = {name: np.flatnonzero(~np.isfinite(s)).tolist() for name, s in scores.items() if not np.isfinite(s).all()}
    if bad:
        where = ", ".join(f"{name} for image(s) {images}" for name, images in bad.items())
        raise NonFiniteScore(f"the guard could not score every image (non-finite {where}): no verdict")


class GuardPipeline:
    """Runs every signal over a batch with one classifier call, then fuses them."""

    def __init__(
        self,
        classify: Classify,
        signals: Sequence[Signal],
        fusion: Fusion | None,
        infected: Sequence[int] = (),
        on_stage: Callable[[str, float], None] = lambda stage, seconds: None,
    ) -> None:
        names = [s.name for s in signals]
        if "detrigger" not in names:
            raise ValueError("the pipeline needs the detrigger signal: the label policy uses its restoration")
        self.classify, self.signals, self.fusion = classify, list(signals), fusion
        self.infected = [int(t) for t in infected]  # labels a suspected image must not be given
        self.on_stage = on_stage  # where the time goes: (stage, seconds) after each stage of a batch

    def run(self, x: np.ndarray) -> GuardResult:
        """x: float32 (B, 1, H, W) in [0, 1]."""
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            self.on_stage(stage, now - clock)
            clock = now

        extras = []
        for s in self.signals:  # the autoencoders run here, and STRIP's blending
            extras.append(s.prepare(x))
            lap(f"{s.name}.prepare")
        everything = np.concatenate([x, *extras])
        lap("concatenate")
        logits, features = self.classify(everything)
        lap("classifier")
        bounds = np.cumsum([len(x), *(len(e) for e in extras)])
        pred = Prediction(logits, features)
        original = pred.take(slice(0, bounds[0]))
        spans = zip(self.signals, bounds[:-1], bounds[1:], strict=True)
        preds = {s.name: pred.take(slice(lo, hi)) for s, lo, hi in spans}
        results = {s.name: s.evaluate(x, e, original, preds[s.name]) for s, e in zip(self.signals, extras, strict=True)}
        scores = {name: r.score for name, r in results.items()}
        if self.fusion is None:  # calibration's raw run: no fused score yet, by design
            score, backdoor = np.full(len(x), math.nan), np.zeros(len(x), bool)
        else:
            score = scores["fused"] = self.fusion.score(results)
            backdoor = score > self.fusion.threshold
        fail_closed(scores)
        restored_images = results["detrigger"].images
        assert restored_images is not None
        restored = preds["detrigger"]
        labels, confidence = trusted_labels(original, restored, backdoor, self.infected)
        lap("signals_and_fusion")
        return GuardResult(original, restored, restored_images, results, score, backdoor, labels, confidence)

    def run_chunked(self, x: np.ndarray, chunk: int = 256) -> list[GuardResult]:
        return [self.run(x[i : i + chunk]) for i in range(0, len(x), chunk)]

    def run_in_chunks(self, x: np.ndarray, chunk: int) -> GuardResult:
        """`run` over at most `chunk` images at a time, as one result: bounds the memory a large batch holds."""
        return GuardResult.concat(self.run_chunked(x, chunk))
