"""The signals added for attacks that are not patches, the registry, and the repaired model as label source."""

import numpy as np
import pytest

from service.guard import DetriggerSignal, GuardPipeline, Prediction, RepairedSignal, SqueezeSignal
from service.signals import LEGACY, REGISTRY, Signal
from service.signals.repaired import jeffreys
from service.signals.squeeze import median_smooth, reduce_bits

RNG = np.random.default_rng(0)
W = RNG.normal(size=(784, 10)).astype(np.float32)


def linear(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = images.reshape(len(images), -1)
    return flat @ W, np.maximum(flat[:, :16], 0)


def test_every_signal_registers_by_name_and_legacy_bundles_keep_their_four() -> None:
    assert {"detrigger", "masked_ae", "strip", "activation", "squeeze", "repaired", "expert"} <= REGISTRY.keys()
    assert all(issubclass(cls, Signal) and cls.name == name for name, cls in REGISTRY.items())
    assert LEGACY == ("detrigger", "masked_ae", "strip", "activation")


def test_bit_depth_reduction_hand_computed() -> None:
    x = np.array([0.0, 0.1, 0.2, 0.5, 0.93, 1.0], np.float32)
    np.testing.assert_allclose(reduce_bits(x, 1), [0, 0, 0, 0, 1, 1])  # 0.5 rounds to even: 0
    np.testing.assert_allclose(reduce_bits(x, 2), [0, 0, 1 / 3, 2 / 3, 1, 1], atol=1e-6)


def test_median_smoothing_removes_an_isolated_pixel_and_keeps_edges() -> None:
    x = np.zeros((1, 1, 6, 6), np.float32)
    x[0, 0, 2, 3] = 1.0  # one bright pixel: the 2x2 median (mean of the middle two of four) drops it
    assert median_smooth(x, 2).max() == 0.0
    edge = np.zeros((1, 1, 6, 6), np.float32)
    edge[..., 3:] = 1.0  # a vertical edge moves by at most the window, values stay 0 / 0.5 / 1
    out = median_smooth(edge, 2)
    np.testing.assert_array_equal(out[..., :2], 0.0)
    np.testing.assert_array_equal(out[..., 3:], 1.0)


def test_squeeze_scores_the_largest_l1_gap_between_softmax_outputs() -> None:
    x = RNG.random((4, 1, 28, 28)).astype(np.float32)
    signal = SqueezeSignal(bits=1, median=2, threshold=0.5)
    extra = signal.prepare(x)
    assert extra.shape == (8, 1, 28, 28)
    original, pred = Prediction(*linear(x)), Prediction(*linear(extra))
    result = signal.evaluate(x, extra, original, pred)
    gaps = np.abs(pred.probs.reshape(2, 4, -1) - original.probs[None]).sum(axis=2)
    np.testing.assert_allclose(result.score, gaps.max(axis=0))
    np.testing.assert_array_equal(result.triggered, result.score > 0.5)
    with pytest.raises(ValueError, match="bits"):
        SqueezeSignal(bits=0, median=2, threshold=None)


def test_repaired_model_runs_once_per_batch_and_is_the_label_source_for_flagged_images() -> None:
    """Two models, one call each; a flagged image takes the repaired model's label, a clean one keeps its own."""
    calls: list[tuple[str, int]] = []
    x = RNG.random((5, 1, 28, 28)).astype(np.float32)
    flip = np.eye(10, dtype=np.float32)[[3, 3, 3, 3, 3]] * 50  # the repaired model says 3 for everything

    def original(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(("classifier", len(images)))
        return linear(images)

    def repaired(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(("repaired_classifier", len(images)))
        return flip[: len(images)], np.zeros((len(images), 16), np.float32)

    from service.guard import Fusion

    signals = [DetriggerSignal(lambda im: im), RepairedSignal(threshold=0.5, score="drop")]
    # the fused score is the repaired signal's percentile; a drop above 0.5 is past the threshold
    fusion = Fusion(np.array([0.0, 0.5, 0.9]), {"detrigger": np.array([2.0, 3.0, 4.0]),
                    "repaired": np.array([-1.0, 0.0, 0.5])}, {"detrigger": 1.0, "repaired": 0.01}, 0.95)  # fmt: skip
    guard = GuardPipeline(original, signals, fusion, models={"repaired_classifier": repaired}, source="repaired")
    result = guard.run(x)
    assert sorted(calls) == [("classifier", 10), ("repaired_classifier", 5)]  # x + detrigger's restoration; x
    own = Prediction(*linear(x)).labels
    drop = result.signals["repaired"].score
    best_other = np.where(own == 3, 0, 3)  # the repaired model's best label other than the original one
    np.testing.assert_array_equal(result.labels, np.where(result.backdoor, best_other, own))
    assert result.source == "repaired"
    assert result.repaired is not None and (result.repaired.labels == 3).all()
    assert result.backdoor.any() == bool((drop > 0.5).any() or (own != 3).any())
    with pytest.raises(ValueError, match="repaired_classifier"):
        GuardPipeline(original, signals, fusion)  # a signal's model must be given
    with pytest.raises(ValueError, match="label source"):
        GuardPipeline(original, signals[:1], fusion, source="repaired")  # no repaired signal to take it from


def test_jeffreys_divergence_hand_computed_symmetric_and_finite_where_probabilities_round() -> None:
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.3, 0.6])
    expected = float(np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p)))
    np.testing.assert_allclose(jeffreys(np.log(p)[None], np.log(q)[None]), [expected], rtol=1e-12)
    a, b = RNG.normal(size=(50, 10)) * 5, RNG.normal(size=(50, 10)) * 5
    np.testing.assert_allclose(jeffreys(a, b), jeffreys(b, a), rtol=1e-12)
    assert (jeffreys(a, b) > 0).all() and (jeffreys(a, a + 3.0) < 1e-12).all()  # every logit shifted: the same p
    sure = np.array([[1000.0, 0.0, 0.0], [0.0, 1000.0, 0.0]])  # probabilities of exactly 1 and 0 in float64
    far = jeffreys(sure, sure[::-1])
    assert np.isfinite(far).all() and (far > 900).all()  # the log-ratio of 1000 survives the rounding
    assert np.isnan(jeffreys(np.array([[np.nan, 0.0]]), np.zeros((1, 2)))).all()  # fails closed downstream


def test_repaired_signal_scores_the_divergence_or_the_legacy_drop() -> None:
    original = Prediction(np.log(np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]])), np.zeros((2, 2)))
    repaired = Prediction(np.log(np.array([[0.05, 0.9, 0.05], [0.35, 0.4, 0.25]])), np.zeros((2, 2)))
    x = np.zeros((2, 1, 2, 2), np.float32)
    new = RepairedSignal(threshold=1.0).evaluate(x, x, original, repaired)
    old = RepairedSignal(threshold=0.5, score="drop").evaluate(x, x, original, repaired)
    np.testing.assert_allclose(new.score, jeffreys(original.logits, repaired.logits))
    np.testing.assert_allclose(old.score, [0.85, 0.05], atol=1e-12)
    np.testing.assert_allclose(new.evidence["drop"], old.score)  # shown either way
    # the outright disagreement (a fired trigger) is far; the hesitation between two labels is near
    assert new.triggered.tolist() == [True, False] and new.score[0] > 100 * new.score[1]
    with pytest.raises(ValueError, match="repaired score"):
        RepairedSignal(threshold=None, score="kl")


def test_both_sources_average_their_probabilities() -> None:
    from service.guard import label_source

    restored = Prediction(np.log(np.array([[0.6, 0.4, 1e-30]])), np.zeros((1, 2)))
    repaired = Prediction(np.log(np.array([[1e-30, 0.3, 0.7]])), np.zeros((1, 2)))
    np.testing.assert_allclose(label_source("both", restored, repaired).probs, [[0.3, 0.35, 0.35]], atol=1e-9)
    assert label_source("repaired", restored, None) is restored  # no repaired model: restoration


def test_chunked_results_keep_the_repaired_prediction() -> None:
    from service.guard import GuardResult

    x = RNG.random((6, 1, 28, 28)).astype(np.float32)
    guard = GuardPipeline(linear, [DetriggerSignal(lambda im: im), RepairedSignal(None)], None,
                          models={"repaired_classifier": linear})  # fmt: skip
    whole, parts = guard.run(x), guard.run_chunked(x, 4)
    joined = GuardResult.concat(parts)
    assert joined.repaired is not None and whole.repaired is not None
    np.testing.assert_allclose(joined.repaired.logits, whole.repaired.logits)
    np.testing.assert_array_equal(joined.take(slice(2, 5)).labels, whole.labels[2:5])


def test_expert_log_probability_stays_ordered_where_float32_probabilities_round_to_one() -> None:
    from service.signals.expert import log_prob

    logits = np.array([[30.0, 0.0], [40.0, 0.0], [1.0, 2.0]], np.float32)
    lp = log_prob(logits, np.array([0, 0, 1]))
    z = logits.astype(np.float64)
    np.testing.assert_allclose(lp[2], z[2, 1] - np.log(np.exp(z[2]).sum()))
    assert Prediction(logits, logits).probs[0, 0] == Prediction(logits, logits).probs[1, 0] == 1.0
    assert lp[0] < lp[1] < 0.0 and np.isfinite(lp).all()


def test_expert_runs_once_per_batch_and_scores_its_agreement_with_the_model() -> None:
    """The expert sees the same images in one call; the score is its log-probability of the model's label."""
    from service.guard import Fusion
    from service.signals.expert import ExpertSignal, log_prob

    calls: list[int] = []
    x = RNG.random((4, 1, 28, 28)).astype(np.float32)
    own = Prediction(*linear(x)).labels
    agree = np.where(np.arange(4)[:, None] < 2, 20.0, -20.0) * np.eye(10, dtype=np.float32)[own]

    def expert(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(images))
        return agree[: len(images)], np.zeros((len(images), 16), np.float32)

    signals = [DetriggerSignal(lambda im: im), ExpertSignal(threshold=-0.1)]
    fusion = Fusion(np.array([0.0, 0.9]), {"detrigger": np.array([2.0, 3.0]), "expert": np.array([-5.0, -1.0])},
                    {"detrigger": 1.0, "expert": 0.1}, 0.95, rule="fisher")  # fmt: skip
    result = GuardPipeline(linear, signals, fusion, models={"backdoor_expert": expert}).run(x)
    assert calls == [4]
    r = result.signals["expert"]
    np.testing.assert_allclose(r.score, log_prob(agree, own))
    np.testing.assert_array_equal(r.triggered, [True, True, False, False])  # the expert still gives their label
    np.testing.assert_array_equal(result.backdoor, [True, True, False, False])
    np.testing.assert_allclose(r.evidence["agreement"], np.exp(r.score))
    assert ExpertSignal.threshold_bounds(10) == (-np.inf, 0.0)
    with pytest.raises(ValueError, match="backdoor_expert"):
        GuardPipeline(linear, signals, fusion)  # its model must be given


def test_mahalanobis_fit_and_score_hand_computed() -> None:
    from service.signals.mahalanobis import SHRINKAGE, MahalanobisSignal, fit_gaussian

    features = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 4.0], [12.0, 4.0]])
    labels = np.array([0, 0, 1, 1])
    g = fit_gaussian(features, labels, 2)
    np.testing.assert_allclose(g["means"], [[1.0, 0.0], [11.0, 4.0]])
    # within-class scatter: x varies by +-1, y not at all; shrinkage keeps y's variance above zero
    cov = np.diag([1.0, 0.0])
    shrunk = (1 - SHRINKAGE) * cov + SHRINKAGE * 0.5 * np.eye(2)
    np.testing.assert_allclose(g["precision"], np.linalg.inv(shrunk), rtol=1e-6)
    signal = MahalanobisSignal(g["means"], g["precision"], threshold=3.0)
    at = np.array([[1.0, 0.0], [11.0, 5.0], [3.0, 0.0]])  # a class mean; 1 off in y; 2 off in x
    logits = np.array([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])  # predicted: 0, 1, 0
    result = signal.evaluate(at, at, Prediction(logits, at), Prediction(logits, at))
    expected = [0.0, 1.0 / (SHRINKAGE * 0.5), 4.0 / ((1 - SHRINKAGE) + SHRINKAGE * 0.5)]
    np.testing.assert_allclose(result.score, expected, rtol=1e-6)
    assert result.triggered.tolist() == [False, True, True]
    # the distance is to the class the model gave: the same features, labelled 1, lie far from class 1's mean
    far = signal.evaluate(at[:1], at[:1], Prediction(np.array([[0.0, 5.0]]), at[:1]), Prediction(logits[:1], at[:1]))
    assert far.score[0] > 100
    with pytest.raises(ValueError, match="every one of the 3 classes"):
        fit_gaussian(features, labels, 3)  # no clean image of class 2: its mean is unknown
    with pytest.raises(ValueError, match="finite"):
        MahalanobisSignal(g["means"], np.full((2, 2), np.nan), None)


def test_a_slice_of_a_prediction_keeps_what_the_batch_computed() -> None:
    """Each request's share of a batch is rendered on the event loop: the labels and probabilities the guard
    thread computed for the batch come with the slice (read-only, equal to computing them afresh), and what the
    batch never computed is still computed on first use."""
    logits = RNG.normal(size=(8, 5)).astype(np.float32)
    whole = Prediction(logits, logits)
    _ = whole.labels, whole.confidence
    part = whole.take(slice(2, 6))
    fresh = Prediction(logits[2:6], logits[2:6])
    assert {"labels", "probs", "confidence"} <= part.__dict__.keys()  # carried, not computed again
    for name in ("labels", "probs", "confidence"):
        np.testing.assert_array_equal(getattr(part, name), getattr(fresh, name))
        assert not getattr(part, name).flags.writeable
    lazy = Prediction(logits, logits).take(slice(0, 3))
    assert "labels" not in lazy.__dict__
    np.testing.assert_array_equal(lazy.labels, logits[:3].argmax(axis=1))
