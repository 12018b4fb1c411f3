"""The guard pipeline, torch-free: classify -> restore -> signals -> fused verdict, on numpy batches.

The signals live in service.signals, one file each, with a two-step interface (prepare, evaluate) so that all
passes of a batch through one model (the input, both restorations, STRIP's N overlays, the squeezed copies) run
as one ONNX Runtime call, and the repaired model's passes as one more.
The fused verdict ranks each score against the clean calibration distribution (an empirical CDF stored
in the manifest) and combines the ranks (Fusion: the largest, or Fisher's sum of surprises).
A score that is not finite fails the batch (NonFiniteScore; the service's 500 guard_failed) rather than pass
as clean: the guard fails closed.
Calibration (training/calibration.py), evaluation and the service all run this same code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate
from typing import Any

import numpy as np

from service.signals import Prediction, Signal, SignalResult, entropy_bits, softmax
from service.signals.activation import ActivationSignal
from service.signals.detrigger import DetriggerSignal
from service.signals.masked_ae import MaskedAESignal
from service.signals.repaired import RepairedSignal
from service.signals.squeeze import SqueezeSignal
from service.signals.strip import Blend, StripSignal, overlay_entropies, strip_entropy, superimpose

__all__ = [
    "RULES", "SOURCES", "ActivationSignal", "Blend", "Classify", "DetriggerSignal", "Fusion", "GuardPipeline",
    "GuardResult", "MaskedAESignal", "NonFiniteScore", "PlainPipeline", "Prediction", "RepairedSignal", "Signal",
    "SignalResult", "SqueezeSignal", "StripSignal", "entropy_bits", "fail_closed", "fused_surprise", "label_source",
    "softmax",
    "strip_entropy", "superimpose", "trusted_labels",
]  # fmt: skip

Classify = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # images -> (logits, features)


RULES = ("max", "fisher")  # how the fused verdict combines the signals' clean-tail ranks (Fusion.rule)


@dataclass(frozen=True)
class Fusion:
    """Combines the signals by how far each score lies in its clean calibration tail.

    A signal's percentile is its clean calibration CDF: the empirical table up to `levels[-1]` (the 90th
    percentile), and above it an exponential tail fitted to the clean scores that exceed it (peaks over
    threshold): 1 - (1 - levels[-1]) * exp(-(score - q) / scale). The tail keeps the ordering beyond the
    largest calibration score, so that a few hundred calibration images still give a threshold that can
    fire (an empirical CDF alone puts everything past its maximum at exactly 1.0, a tie).

    rule "max" (bundles calibrated before the rule existed): the fused score is the largest percentile, "how
    far into the clean tail is the most alarmed signal". rule "fisher" (new bundles): the surprises
    -log(1 - percentile) are summed, as in Fisher's method, and the fused score is 1 - exp(-sum), which is
    the percentile itself when one signal speaks. Two signals that are each moderately unusual then add up,
    where the max needs one of them to be extreme: an attack that no single signal separates well (WaNet's
    warp: the backdoor expert and the repaired model each half-sure) is caught by their agreement. Either
    way the threshold is the (1 - target FPR) quantile of clean held-out fused scores.
    """

    levels: np.ndarray  # (Q,) increasing probabilities in [0, levels[-1]]
    quantiles: Mapping[str, np.ndarray]  # signal -> (Q,) clean calibration scores at those levels
    tail_scale: Mapping[str, float]  # signal -> mean excess of clean scores over the table's last quantile
    threshold: float
    rule: str = "max"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown fusion rule {self.rule!r}; choose from {RULES}")
        if not 0 <= float(self.levels[-1]) < 1:  # the tail starts below 1: every surprise below it is finite
            raise ValueError(f"fusion levels must end in [0, 1), not at {float(self.levels[-1])}")

    @staticmethod
    def to_percentile(surprise: np.ndarray) -> np.ndarray:
        """A surprise -log(1 - p) back to p: a signal's clean percentile, or the fused score from the fused one."""
        return -np.expm1(-surprise)

    def percentile(self, name: str, score: np.ndarray) -> np.ndarray:
        return self.to_percentile(self.surprise(name, score))

    def surprise(self, name: str, score: np.ndarray) -> np.ndarray:
        """-log(1 - percentile), computed without rounding the far tail to infinity."""
        table = self.quantiles[name]
        body = np.interp(score, table, self.levels, left=0.0)
        return self._surprise(score, body, table[-1], self.tail_scale[name])

    def _surprise(self, score: np.ndarray, body: np.ndarray, last: Any, scale: Any) -> np.ndarray:
        """The surprise from a score, its table's percentile `body`, the table's last quantile and the tail's scale
        (scalars for one signal, (S, 1) columns for `surprise_matrix`'s rows): below the last quantile the
        table's, above it the exponential tail's."""
        top = float(self.levels[-1])
        excess = np.maximum(score - last, 0.0) / scale
        return np.where(score > last, -math.log1p(-top) + excess, -np.log1p(-np.minimum(body, top)))

    @cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every signal's table (S, Q), its last quantile (S, 1) and tail scale (S, 1), in `quantiles`' order."""
        tables = np.stack([np.asarray(self.quantiles[name], np.float64) for name in self.quantiles])
        scales = np.array([[float(self.tail_scale[name])] for name in self.quantiles])
        return tables, tables[:, -1:], scales

    def surprise_matrix(self, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """Signal name -> raw scores (every signal of the fusion) -> surprises (S, B), rows in `quantiles`' order.

        `surprise` for every signal at once: the same operations on the same float64 values, so the same bits,
        in a dozen numpy calls for the batch instead of a dozen per signal (at one image, numpy's per-call cost
        is most of the guard's time after the model calls)."""
        tables, last, scales = self._tables
        x = np.stack([np.asarray(scores[name], np.float64) for name in self.quantiles])
        body = np.stack([np.interp(row, table, self.levels, left=0.0) for row, table in zip(x, tables, strict=True)])
        return self._surprise(x, body, last, scales)

    def surprises(self, scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Signal name -> raw scores (every signal of the fusion) -> signal name -> surprises."""
        return dict(zip(self.quantiles, self.surprise_matrix(scores), strict=True))

    def fuse(self, surprises: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
        """Every signal's surprises (`surprises`, or `surprise_matrix`'s (S, B)) -> fused scores in [0, 1]."""
        parts = surprises if isinstance(surprises, np.ndarray) else np.stack(list(surprises.values()))
        return self.to_percentile(parts.max(axis=0) if self.rule == "max" else parts.sum(axis=0))

    def score(self, results: Mapping[str, SignalResult]) -> np.ndarray:
        return self.combine({name: results[name].score for name in self.quantiles})

    def combine(self, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """Signal name -> raw scores (every signal of the fusion) -> fused scores in [0, 1]."""
        return self.fuse(self.surprise_matrix(scores))

    @classmethod
    def from_manifest(cls, fused: Mapping[str, Any]) -> Fusion:
        return cls(
            levels=np.asarray(fused["levels"], np.float64),
            quantiles={k: np.asarray(v, np.float64) for k, v in fused["quantiles"].items()},
            tail_scale={k: float(v) for k, v in fused["tail_scale"].items()},
            threshold=float(fused["threshold"]),
            rule=str(fused.get("rule", "max")),
        )


def fused_surprise(score: np.ndarray | float) -> np.ndarray:
    """-ln(1 - fused score): the surprise `Fusion.combine` turned into the score (the signals' sum under the
    Fisher rule, the largest under max); inf where the score rounds to 1."""
    with np.errstate(divide="ignore"):
        return -np.log1p(-np.minimum(score, 1.0))


@dataclass
class GuardResult:
    original: Prediction
    restored: Prediction  # after the de-trigger AE
    restored_images: np.ndarray  # (B, C, H, W)
    signals: dict[str, SignalResult]
    score: np.ndarray  # (B,) fused score, NaN without a calibrated fusion
    backdoor: np.ndarray  # (B,) bool
    labels: np.ndarray  # (B,) the label to trust (see `trusted_labels`)
    confidence: np.ndarray  # (B,) its probability
    repaired: Prediction | None = None  # the repaired model's prediction, when the bundle has one
    source: str = "restored"  # where a flagged image's label comes from: restored, repaired or both
    # signal -> (B,) its clean percentile (Fusion.percentile), as the fused verdict weighed it; empty without one
    percentiles: dict[str, np.ndarray] = field(default_factory=dict)

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
            self.repaired.take(sl) if self.repaired is not None else None,
            self.source,
            {k: v[sl] for k, v in self.percentiles.items()},
        )

    def sources(self) -> tuple[str, ...]:
        """The label sources these images can take a label from: all of SOURCES where the repaired model ran."""
        return SOURCES if self.repaired is not None else ("restored",)

    def labels_from(self, source: str, backdoor: np.ndarray, infected: Sequence[int]) -> np.ndarray:
        """The labels the label policy gives these images with `source` as the label source and `backdoor` as
        the verdicts (what a bundle calibrated with that source would answer)."""
        return trusted_labels(self.original, label_source(source, self.restored, self.repaired), backdoor, infected)[0]

    @staticmethod
    def concat(parts: Sequence[GuardResult]) -> GuardResult:
        """The results of consecutive chunks of a batch as one (the inverse of `take`)."""
        if len(parts) == 1:
            return parts[0]
        cat = np.concatenate

        def prediction(ps: Sequence[Prediction]) -> Prediction:
            return Prediction(cat([p.logits for p in ps]), cat([p.features for p in ps]))

        def optional(arrays: Sequence[np.ndarray | None]) -> np.ndarray | None:
            return None if arrays[0] is None else cat([a for a in arrays if a is not None])

        def signal(rs: Sequence[SignalResult]) -> SignalResult:
            evidence = {k: cat([r.evidence[k] for r in rs]) for k in rs[0].evidence}
            return SignalResult(
                cat([r.score for r in rs]), cat([r.triggered for r in rs]), evidence,
                optional([r.images for r in rs]), optional([r.labels for r in rs]),
            )  # fmt: skip

        first = parts[0]
        repaired = [p.repaired for p in parts if p.repaired is not None]
        return GuardResult(
            prediction([p.original for p in parts]),
            prediction([p.restored for p in parts]),
            cat([p.restored_images for p in parts]),
            {name: signal([p.signals[name] for p in parts]) for name in first.signals},
            cat([p.score for p in parts]),
            cat([p.backdoor for p in parts]),
            cat([p.labels for p in parts]),
            cat([p.confidence for p in parts]),
            prediction(repaired) if first.repaired is not None else None,
            first.source,
            {name: cat([p.percentiles[name] for p in parts]) for name in first.percentiles},
        )


SOURCES = ("restored", "repaired", "both")  # label sources for flagged images (see `label_source`)


def label_source(source: str, restored: Prediction, repaired: Prediction | None) -> Prediction:
    """The prediction a flagged image's label is taken from: the de-triggered image's, the repaired model's, or
    both (their probabilities averaged). Calibration chooses per bundle, on Neural Cleanse's stand-in triggers."""
    if source == "restored" or repaired is None:
        return restored
    if source == "repaired":
        return repaired
    mean = (restored.probs + repaired.probs) / 2
    return Prediction(np.log(np.maximum(mean, 1e-30)), restored.features)


def trusted_labels(
    original: Prediction, source: Prediction, backdoor: np.ndarray, infected: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Label policy: the original prediction, or for a suspected backdoor the label source's best label (see
    `label_source`: chosen per bundle at calibration) among those the attacker cannot want.

    A suspected image never keeps the label the original model gave it: if the trigger worked, that label is
    the attacker's (single-target, all-to-all and clean-label alike), whatever the source says; nor does it get a
    label Neural Cleanse found infected. The cost is on clean images flagged by mistake (the FPR), which lose
    their label when it was right; the response still shows the original label.
    """
    rows = np.arange(len(backdoor))
    probs = source.probs.copy()
    probs[rows, original.labels] = -1.0
    suspect = probs.argmax(axis=1)  # never the original label, whatever else is excluded
    if infected:
        probs[:, list(infected)] = -1.0
        # where the infected labels and the original leave no label at all, the best other than the original
        suspect = np.where(probs.max(axis=1) >= 0, probs.argmax(axis=1), suspect)
    labels = np.where(backdoor, suspect, original.labels)
    confidence = np.where(backdoor, source.probs[rows, suspect], original.confidence)
    return labels, confidence


class NonFiniteScore(ValueError):
    """A signal could not score an image. The service answers 500 guard_failed (service.errors.GuardFailure);
    defined here, free of FastAPI, because training runs this module without the serve extra."""


def _timed(classify: Classify, images: np.ndarray) -> tuple[Prediction, float]:
    """A model call on the side thread, with its duration (the stage metric is reported from the guard's thread)."""
    start = time.perf_counter()
    pred = Prediction(*classify(images))
    return pred, time.perf_counter() - start


def fail_closed(scores: Mapping[str, np.ndarray]) -> None:
    """Raise NonFiniteScore when any image has a non-finite score: NaN compares false with every threshold, so
    an image a signal could not score would otherwise come back clean, with the attacker's label."""
    values = list(scores.values())
    if values and np.isfinite(np.concatenate(values)).all():  # the usual case, in two numpy calls
        return
    bad = {name: np.flatnonzero(~np.isfinite(s)).tolist() for name, s in scores.items() if not np.isfinite(s).all()}
    if bad:
        where = ", ".join(f"{name} for image(s) {images}" for name, images in bad.items())
        raise NonFiniteScore(f"the guard could not score every image (non-finite {where}): no verdict")


# The largest batch a pipeline hands to its `small` twin: the bundle's models on half the cores each (Bundle.small),
# the second opinions (the repaired model, the expert) on a side thread beside the autoencoders and the classifier.
# A one-off in-process timing on 2 cores (not a repo command): faster up to 4 images, slower from 8 on, where each
# model's own intra-op threads keep the cores busy by themselves. make bench measures the service's latency.
SIDE_MAX_IMAGES = 4


class GuardPipeline:
    """Runs every signal over a batch with one call per model (the classifier, the repaired one), then fuses."""

    def __init__(
        self,
        classify: Classify,
        signals: Sequence[Signal],
        fusion: Fusion | None,
        infected: Sequence[int] = (),
        on_stage: Callable[[str, float], None] = lambda stage, seconds: None,
        models: Mapping[str, Classify] | None = None,
        source: str = "restored",
        early_exit: bool = True,
        side_thread: bool = False,
        small: GuardPipeline | None = None,
    ) -> None:
        names = [s.name for s in signals]
        if "detrigger" not in names:
            raise ValueError("the pipeline needs the detrigger signal: the label policy uses its restoration")
        # small: the same guard over other sessions of the same models, which runs batches of at most
        # SIDE_MAX_IMAGES images (build_pipeline: Bundle.small's sessions, with a side thread). Set first: what is
        # set on this pipeline later (`fusion`, `on_stage`) reaches it.
        self.small = small
        self.classify, self.signals, self.fusion = classify, list(signals), fusion
        self.models: dict[str, Classify] = {"classifier": classify, **(models or {})}
        missing = sorted({s.model for s in signals} - self.models.keys())
        if missing:
            raise ValueError(f"signals need model(s) {missing}, which the pipeline was not given")
        if source not in SOURCES or (source != "restored" and "repaired" not in names):
            raise ValueError(
                f"label source {source!r}: choose from {SOURCES} (repaired and both need the repaired signal)"
            )
        self.source = source
        self.infected = [int(t) for t in infected]  # labels a suspected image must not be given
        self.on_stage = on_stage  # where the time goes: (stage, seconds) after each stage of a batch
        self.early_exit = early_exit  # STRIP stops where no remaining overlay can change the verdict (`_staged`)
        # side_thread: the models other than the classifier run on a thread of their own, beside the autoencoders
        # and the classifier (each model then needs cores of its own: Bundle.small); else after the classifier.
        self._side = ThreadPoolExecutor(1, thread_name_prefix="guard_side") if side_thread else None

    # What may be set on a pipeline after it is built (Runtime: the metrics hook, GUARD_FUSED_THRESHOLD's fusion)
    # is passed on to its `small` twin as it is set, so that both answer alike whatever the batch's size.
    @property
    def fusion(self) -> Fusion | None:
        return self._fusion

    @fusion.setter
    def fusion(self, fusion: Fusion | None) -> None:
        self._fusion = fusion
        if self.small is not None:
            self.small.fusion = fusion

    @property
    def on_stage(self) -> Callable[[str, float], None]:
        return self._on_stage

    @on_stage.setter
    def on_stage(self, on_stage: Callable[[str, float], None]) -> None:
        self._on_stage = on_stage
        if self.small is not None:
            self.small.on_stage = on_stage

    def _staged(self) -> StripSignal | None:
        """The STRIP signal to run in rounds: only with a fused verdict to decide, and more than one round."""
        if not self.early_exit or self.fusion is None:
            return None
        strip = next((s for s in self.signals if isinstance(s, StripSignal)), None)
        return strip if strip is not None and len(strip.rounds) > 1 else None

    def _finish_strip(
        self, x: np.ndarray, strip: StripSignal, first: Prediction, results: dict[str, SignalResult],
        classes: int, lap: Callable[[str], None],
    ) -> SignalResult:  # fmt: skip
        """STRIP in rounds, soundly. After each round, every image's final STRIP score (minus the mean entropy of
        all N overlays) lies in a range (StripSignal.score_range: each overlay not yet classified adds an entropy
        between 0 and log2 C). The fusion is monotone in every score, so when the fused score is above the
        threshold even at the range's least suspicious end, or at or below it even at its most suspicious end,
        no remaining overlay can change the verdict: that image stops. The others get the next round's overlays,
        in one classifier call. A stopped image's STRIP entropy is the mean over the overlays it was given, which
        lies in its range, so its fused score falls on the side of the threshold its verdict was decided on.
        A non-finite score never decides (NaN compares false), so such an image runs every round and then
        fails the batch (fail_closed)."""
        assert self.fusion is not None
        total = overlay_entropies(first.probs, strip.rounds[0]).sum(axis=1)
        done = np.full(len(x), strip.rounds[0])
        others = {name: r.score for name, r in results.items()}
        for r in range(1, len(strip.rounds)):
            low, high = strip.score_range(total, done, classes)
            sure_flagged = self.fusion.combine({**others, strip.name: low}) > self.fusion.threshold
            sure_clean = self.fusion.combine({**others, strip.name: high}) <= self.fusion.threshold
            todo = np.flatnonzero(~(sure_flagged | sure_clean))
            if not len(todo):
                break
            pred = Prediction(*self.classify(strip.prepare_round(x[todo], r)))
            lap(f"{strip.name}.round{r + 1}")
            total[todo] += overlay_entropies(pred.probs, strip.rounds[r] - strip.rounds[r - 1]).sum(axis=1)
            done[todo] = strip.rounds[r]
        return strip.result(total / done, done)

    def run(self, x: np.ndarray) -> GuardResult:
        """x: float32 (B, C, H, W) in [0, 1]."""
        if self.small is not None and len(x) <= SIDE_MAX_IMAGES:
            return self.small.run(x)
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            self.on_stage(stage, now - clock)
            clock = now

        staged = self._staged()
        extras: dict[str, np.ndarray] = {}
        calls: dict[str, tuple[list[Signal], int, Prediction | Future[tuple[Prediction, float]]]] = {}
        # The classifier last: the other models' calls (the repaired model, the expert) go first, to the side
        # thread where there is one, and run while the autoencoders and the classifier do.
        for model in sorted(self.models, key=lambda m: m == "classifier"):
            mine = [s for s in self.signals if s.model == model]
            for s in mine:  # the autoencoders run here, and STRIP's blending (its first round when staged)
                extras[s.name] = staged.prepare_round(x, 0) if s is staged else s.prepare(x)
                lap(f"{s.name}.prepare")
            head = [x] if model == "classifier" else []
            if not mine and not head:
                continue
            everything = np.concatenate([*head, *(extras[s.name] for s in mine)])
            lap("concatenate")
            if model != "classifier" and self._side is not None:
                calls[model] = (mine, len(head), self._side.submit(_timed, self.models[model], everything))
            else:
                calls[model] = (mine, len(head), Prediction(*self.models[model](everything)))
                lap(model)
        preds: dict[str, Prediction] = {}
        original: Prediction | None = None
        for model, (mine, first, call) in calls.items():  # one call per model over every image it must classify
            if isinstance(call, Future):
                pred, seconds = call.result()
                self.on_stage(model, seconds)  # on the side thread: overlaps the stages around it
            else:
                pred = call
            bounds = list(accumulate([first * len(x), *(len(extras[s.name]) for s in mine)]))
            if model == "classifier":
                original = pred.take(slice(0, bounds[0]))
            preds.update(
                {s.name: pred.take(slice(lo, hi)) for s, lo, hi in zip(mine, bounds[:-1], bounds[1:], strict=False)}
            )
        if self._side is not None:
            lap("side_wait")  # what the other models' calls still took after the classifier's
        assert original is not None
        results = {
            s.name: s.evaluate(x, extras[s.name], original, preds[s.name]) for s in self.signals if s is not staged
        }
        if staged is not None:
            results[staged.name] = self._finish_strip(
                x, staged, preds[staged.name], results, original.logits.shape[1], lap
            )
            results = {s.name: results[s.name] for s in self.signals}  # the signals' order
        scores = {name: r.score for name, r in results.items()}
        percentiles: dict[str, np.ndarray] = {}
        if self.fusion is None:  # calibration's raw run: no fused score yet, by design
            score, backdoor = np.full(len(x), math.nan), np.zeros(len(x), bool)
        else:
            surprises = self.fusion.surprise_matrix(scores)
            score = scores["fused"] = self.fusion.fuse(surprises)
            percentiles = dict(zip(self.fusion.quantiles, self.fusion.to_percentile(surprises), strict=True))
            backdoor = score > self.fusion.threshold
        fail_closed(scores)
        restored_images = results["detrigger"].images
        assert restored_images is not None
        restored = preds["detrigger"]
        repaired = preds.get("repaired")
        source = label_source(self.source, restored, repaired)
        labels, confidence = trusted_labels(original, source, backdoor, self.infected)
        lap("signals_and_fusion")
        return GuardResult(
            original, restored, restored_images, results, score, backdoor, labels, confidence, repaired, self.source,
            percentiles,
        )  # fmt: skip

    def run_chunked(self, x: np.ndarray, chunk: int = 256) -> list[GuardResult]:
        return [self.run(x[i : i + chunk]) for i in range(0, len(x), chunk)]

    def run_in_chunks(self, x: np.ndarray, chunk: int) -> GuardResult:
        """`run` over at most `chunk` images at a time, as one result: bounds the memory a large batch holds."""
        return GuardResult.concat(self.run_chunked(x, chunk))


class PlainPipeline(GuardPipeline):
    """The guard switched off (GUARD_SIGNALS=none): one classifier call per batch and the model's own label.

    For users who want plain inference through the same stack (batching, limits, auth, metrics), and the
    benchmark's denominator. It gives no verdict: the service answers `backdoor: null`, never "clean". Logits
    that are not finite still fail the batch."""

    def __init__(self, classify: Classify, on_stage: Callable[[str, float], None] = lambda stage, s: None) -> None:
        self.small = None
        self.classify, self.signals, self.fusion, self.on_stage = classify, [], None, on_stage
        self.models, self.source, self.infected = {"classifier": classify}, "original", []

    def run(self, x: np.ndarray) -> GuardResult:
        start = time.perf_counter()
        original = Prediction(*self.classify(x))
        self.on_stage("classifier", time.perf_counter() - start)
        fail_closed({"classifier": original.logits.sum(axis=1)})
        n = len(x)
        return GuardResult(
            original, original, x, {}, np.full(n, math.nan), np.zeros(n, bool), original.labels,
            original.confidence, None, "original",
        )  # fmt: skip
