"""What every signal shares: the predictions it reads, the result it returns, and the `Signal` interface.

A signal is one file in this package: a `Signal` subclass with a `name`. Subclasses register themselves by
name (`REGISTRY`), the bundle's manifest lists which ones it runs (`signals`: name -> parameters), and
`from_bundle` builds each from the bundle's files and its calibrated threshold. Nothing else changes when a
signal is added.

The two-step interface lets every classifier pass of a batch run as one ONNX Runtime call per model:
  prepare(x)  -> the extra images it needs classified by `model` (the classifier, or the repaired one),
                 float32 (k * B, C, H, W)
  evaluate(x, extra, original, pred) -> SignalResult: a score (higher = more suspicious), its own verdict,
                 and per-image evidence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from service.bundle import Bundle

REGISTRY: dict[str, type[Signal]] = {}
ImageModel = Callable[[np.ndarray], np.ndarray]  # images -> restored images


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


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class Prediction:
    """A model's output for a batch. probs, labels and confidence are computed once, on first use (each signal,
    the label policy and the response read them), and read-only: a caller that needs to change one copies it."""

    logits: np.ndarray  # (B, C)
    features: np.ndarray  # (B, D), penultimate layer

    @cached_property
    def probs(self) -> np.ndarray:
        return _frozen(softmax(self.logits))

    @cached_property
    def labels(self) -> np.ndarray:
        return _frozen(self.logits.argmax(axis=1))

    @cached_property
    def confidence(self) -> np.ndarray:
        return _frozen(self.probs.max(axis=1))

    def take(self, sl: slice) -> Prediction:
        """Images sl of the batch, with what was already computed for the batch (a slice of a read-only array is
        read-only): each request's share is rendered on the event loop, which would otherwise compute it again."""
        part = Prediction(self.logits[sl], self.features[sl])
        for name in ("probs", "labels", "confidence"):
            if name in self.__dict__:
                part.__dict__[name] = self.__dict__[name][sl]
        return part


@dataclass
class SignalResult:
    score: np.ndarray  # (B,) higher = more suspicious
    triggered: np.ndarray  # (B,) bool, this signal's own verdict
    evidence: dict[str, np.ndarray] = field(default_factory=dict)  # per-image values for the response
    images: np.ndarray | None = None  # restored images, for restoration signals
    labels: np.ndarray | None = None  # (B,) the label this signal would give, for signals that are label sources

    def take(self, sl: slice) -> SignalResult:
        images = self.images[sl] if self.images is not None else None
        labels = self.labels[sl] if self.labels is not None else None
        evidence = {k: v[sl] for k, v in self.evidence.items()}
        return SignalResult(self.score[sl], self.triggered[sl], evidence, images, labels)


class Signal(ABC):
    name: ClassVar[str]
    model: ClassVar[str] = "classifier"  # the bundle model that classifies `prepare`'s images
    threshold: float | None = None  # on the signal's own evidence (see `report`); None before calibration
    # A bundle file (manifest `files` key) the signal fits on clean data at export (`fit_reference`); None: none
    reference: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls

    @classmethod
    def from_bundle(cls, bundle: Bundle, params: Mapping[str, Any], threshold: float | None) -> Signal:
        """Build the signal from the bundle's files, its manifest parameters and its calibrated threshold."""
        raise NotImplementedError(f"signal {cls.__name__} cannot be built from a bundle")

    @classmethod
    def fit_reference(
        cls, classify: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], images: np.ndarray, labels: np.ndarray,
        classes: int, path: Path,
    ) -> None:  # fmt: skip
        """Write the `reference` file to `path` from clean images, their true labels and the exported classifier
        (images -> logits, features). Only for signals with a reference."""
        raise NotImplementedError(f"signal {cls.__name__} has no reference to fit")

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Extra images this signal needs classified; none by default."""
        return x[:0]

    @abstractmethod
    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        """Score a batch from the original prediction and the prediction of `extra`."""

    @classmethod
    def fit(cls, results: SignalResult, fpr: float) -> dict[str, Any]:
        """Its own threshold from clean calibration results: by default the (1 - fpr) quantile of the score."""
        threshold = float(np.quantile(results.score, 1 - fpr))
        return {"threshold": threshold, "calibration_fpr": float(np.mean(results.score > threshold))}

    @classmethod
    def threshold_bounds(cls, classes: int, params: Mapping[str, Any] | None = None) -> tuple[float, float] | None:
        """The range a calibrated threshold must lie in (manifest validation; params: the manifest's parameters
        of the signal); None: the signal has none."""
        return (-np.inf, np.inf)

    @classmethod
    def score_bounds(cls, classes: int, params: Mapping[str, Any] | None = None) -> tuple[float, float]:
        """The range its scores lie in (manifest validation of its fusion table): by default its threshold's."""
        return cls.threshold_bounds(classes, params) or (-np.inf, np.inf)

    def calibrated_with(self) -> dict[str, Any]:
        """The parameters its scores depend on, recorded beside its threshold by calibration."""
        return {}

    @classmethod
    def parameter_problems(cls, params: Mapping[str, Any], calibrated: Mapping[str, Any] | None) -> list[str]:
        """Manifest validation of its parameters (`signals.NAME`), and of the parameters recorded with its
        threshold (`thresholds.NAME`; None before calibration) against them: a threshold fitted to another
        score cannot be trusted."""
        return []

    def report(self, result: SignalResult, i: int) -> dict[str, Any]:
        """Image i's evidence as JSON values: its own verdict, the evidence arrays, the threshold."""
        out: dict[str, Any] = {"triggered": bool(result.triggered[i])}
        out.update({k: v[i].item() for k, v in result.evidence.items()})
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out


class SecondOpinion(Signal):
    """A signal that classifies the same images through another model of the bundle (`model`, made by the
    training stage `stage`) and scores how that model's prediction relates to the original one."""

    stage: ClassVar[str]

    def __init__(self, threshold: float | None) -> None:
        self.threshold = threshold

    @classmethod
    def from_bundle(cls, bundle: Bundle, params: Mapping[str, Any], threshold: float | None) -> Signal:
        if cls.model not in bundle.sessions:
            raise ValueError(f"the {cls.name} signal needs the bundle's {cls.model} (python -m training {cls.stage})")
        return cls(threshold)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return x  # the same images, through the other model


def above(score: np.ndarray, threshold: float | None) -> np.ndarray:
    return score > threshold if threshold is not None else np.zeros(score.shape, bool)


def confidence_drop(original: Prediction, other: Prediction) -> np.ndarray:
    """How much `other` lowers the probability of the originally predicted label, in [-1, 1]."""
    rows = np.arange(len(original.logits))
    return original.probs[rows, original.labels] - other.probs[rows, original.labels]


def drop_result(original: Prediction, other: Prediction, threshold: float | None, **extra: Any) -> SignalResult:
    """A signal scored by `confidence_drop` against its threshold, with the other prediction as evidence."""
    score = confidence_drop(original, other)
    evidence = {"label": other.labels, "confidence": other.confidence, "score": score}
    return SignalResult(score=score, triggered=above(score, threshold), evidence=evidence, **extra)
