import math
from collections.abc import Callable

import numpy as np
import pytest

from service.guard import (
    RULES,
    ActivationSignal,
    DetriggerSignal,
    Fusion,
    GuardPipeline,
    MaskedAESignal,
    StripSignal,
    entropy_bits,
    softmax,
    strip_entropy,
    superimpose,
)

RNG = np.random.default_rng(0)
W = RNG.normal(size=(784, 10)).astype(np.float32)  # a fixed linear "classifier"


def linear_classify(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = images.reshape(len(images), -1)
    return flat @ W, np.maximum(flat[:, :16], 0)


def test_entropy_hand_computed() -> None:
    probs = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    np.testing.assert_allclose(entropy_bits(probs), [1.0, 0.0, 1.5])
    np.testing.assert_allclose(entropy_bits(np.full((1, 10), 0.1)), [math.log2(10)])


def test_superimpose_follows_the_original_code_and_art() -> None:
    x = np.full((2, 1, 2, 2), 0.75, np.float32)
    overlays = np.stack([np.full((1, 2, 2), v, np.float32) for v in (0.5, 1.0, 0.0)])
    summed = superimpose(x, overlays, "sum")
    assert summed.shape == (6, 1, 2, 2)
    np.testing.assert_allclose(summed[:3, 0, 0, 0], [1.25, 1.75, 0.75])  # no clipping, as the paper's code
    np.testing.assert_allclose(superimpose(x, overlays, "mean")[:3, 0, 0, 0], [0.625, 0.875, 0.375])


def test_strip_entropy_is_the_mean_per_copy_entropy() -> None:
    # 2 inputs x 2 copies: per-copy entropies 1, 0 | 1.5, 1.5
    probs = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5], [0.5, 0.25, 0.25]])
    np.testing.assert_allclose(strip_entropy(probs, 2), [0.5, 1.5])


def paper_strip(x: np.ndarray, bank: np.ndarray, n: int) -> np.ndarray:
    """Gao et al., one input and one overlay at a time."""
    out = []
    for image in x:
        entropies = []
        for overlay in bank[:n]:
            p = softmax(linear_classify((image + overlay)[None])[0])[0]
            entropies.append(-sum(float(q) * math.log2(float(q)) for q in p if q > 0))
        out.append(sum(entropies) / n)
    return np.array(out)


def test_strip_signal_matches_the_paper_loop() -> None:
    x = RNG.random((5, 1, 28, 28)).astype(np.float32) * 0.1
    bank = RNG.random((12, 1, 28, 28)).astype(np.float32) * 0.1
    signal = StripSignal(bank, 8, "sum", threshold=1.0)
    extra = signal.prepare(x)
    logits, features = linear_classify(np.concatenate([x, extra]))
    from service.guard import Prediction

    result = signal.evaluate(x, extra, Prediction(logits[:5], features[:5]), Prediction(logits[5:], features[5:]))
    np.testing.assert_allclose(result.evidence["entropy"], paper_strip(x, bank, 8), rtol=1e-5)
    np.testing.assert_array_equal(result.triggered, result.evidence["entropy"] <= 1.0)
    with pytest.raises(ValueError, match="bank"):
        StripSignal(bank, 13, "sum", None)


def test_fusion_takes_the_largest_percentile() -> None:
    levels = np.array([0.0, 0.25, 0.5])
    quantiles = {"a": np.array([0.0, 1.0, 2.0]), "b": np.array([10.0, 20.0, 30.0])}
    fusion = Fusion(levels, quantiles, {"a": 1.0, "b": 10.0}, threshold=0.9)
    from service.guard import SignalResult

    results = {
        "a": SignalResult(np.array([0.5, 1.5, 3.0, -1.0]), np.zeros(4, bool)),
        "b": SignalResult(np.array([10.0, 10.0, 10.0, 25.0]), np.zeros(4, bool)),
    }
    # body: linear in the table; tail above 2.0: 1 - 0.5 * exp(-(3 - 2) / 1)
    np.testing.assert_allclose(fusion.score(results), [0.125, 0.375, 1 - 0.5 * np.exp(-1), 0.375])


def test_fusion_tail_is_continuous_and_keeps_order_past_the_table() -> None:
    fusion = Fusion(np.array([0.0, 0.9]), {"a": np.array([0.0, 1.0])}, {"a": 0.5}, threshold=0.99)
    scores = np.array([1.0, 1.0 + 1e-9, 2.0, 3.0, 50.0])
    p = fusion.percentile("a", scores)
    assert p[0] == pytest.approx(0.9) and p[1] == pytest.approx(0.9)
    assert np.all(np.diff(p) > 0) and p[-1] < 1.0 + 1e-12  # strictly increasing: no tie at 1.0


def test_fusion_of_every_signal_at_once_is_each_signal_alone_bit_for_bit() -> None:
    """surprise_matrix (the service's path) and surprise (one signal) must give the same bits: a threshold
    calibrated through one is compared with scores fused through the other."""
    levels = np.linspace(0.0, 0.9, 7)
    quantiles = {"a": np.linspace(-3.0, 3.0, 7), "b": np.geomspace(1e-3, 1e3, 7), "c": np.linspace(0.0, 1.0, 7)}
    tails = {"a": 0.7, "b": 250.0, "c": 1e-6}
    scores = {
        "a": RNG.normal(0.0, 4.0, 64).astype(np.float32),  # float32, as most signals' scores are
        "b": np.concatenate([RNG.exponential(300.0, 60), [np.inf, -np.inf, np.nan, 1e300]]),
        "c": np.concatenate([RNG.random(62) * 1.2, [1.0, 1.0 + 1e-12]]),
    }
    for rule in RULES:
        fusion = Fusion(levels, quantiles, tails, threshold=0.5, rule=rule)
        matrix = fusion.surprise_matrix(scores)
        alone = np.stack([fusion.surprise(name, scores[name]) for name in quantiles])
        np.testing.assert_array_equal(matrix, alone)  # NaN where NaN, inf where inf
        parts = list(alone)
        expected = fusion.to_percentile(np.max(parts, axis=0) if rule == "max" else np.sum(parts, axis=0))
        np.testing.assert_array_equal(fusion.combine(scores), expected)
        np.testing.assert_array_equal(fusion.fuse(fusion.surprises(scores)), expected)


def make_pipeline(fusion: Fusion | None) -> GuardPipeline:
    bank = RNG.random((16, 1, 28, 28)).astype(np.float32)

    def detrigger(x: np.ndarray) -> np.ndarray:
        out = x.copy()
        out[:, :, :6, :6] = 0.0  # "removes" anything in the top-left corner
        return out

    return GuardPipeline(
        linear_classify,
        [
            DetriggerSignal(detrigger),
            MaskedAESignal(lambda x: x * 0.9, threshold=0.5),
            StripSignal(bank, 4, "sum", threshold=0.1),
            ActivationSignal({0: [1, 2]}, threshold=0.5),
        ],
        fusion,
    )


def test_pipeline_label_policy_and_shapes() -> None:
    x = RNG.random((6, 1, 28, 28)).astype(np.float32)
    x[:3, :, :6, :6] = 1.0  # a corner "trigger" on half of them
    uncalibrated = make_pipeline(None).run(x)
    assert np.isnan(uncalibrated.score).all() and not uncalibrated.backdoor.any()
    np.testing.assert_array_equal(uncalibrated.labels, uncalibrated.original.labels)

    levels = np.linspace(0, 0.9, 3)
    names = ("detrigger", "masked_ae", "strip", "activation")
    quantiles = {name: np.array([-1e9, 0.0, 1e9]) for name in names}
    fusion = Fusion(levels, quantiles, dict.fromkeys(names, 1.0), threshold=0.0)
    guarded = make_pipeline(fusion).run(x)  # everything is "suspicious"
    assert guarded.backdoor.all()
    # each suspect takes the restored image's best label other than its original one
    probs = guarded.restored.probs.copy()
    probs[np.arange(6), guarded.original.labels] = -1
    np.testing.assert_array_equal(guarded.labels, probs.argmax(axis=1))
    assert (guarded.labels != guarded.original.labels).all()
    np.testing.assert_array_equal(guarded.restored.labels, linear_classify(guarded.restored_images)[0].argmax(1))
    changed = guarded.signals["detrigger"].triggered
    np.testing.assert_array_equal(changed, guarded.original.labels != guarded.restored.labels)
    assert guarded.restored_images.shape == x.shape
    assert set(guarded.signals) == {"detrigger", "masked_ae", "strip", "activation"}


def test_pipeline_needs_the_detrigger_signal() -> None:
    with pytest.raises(ValueError, match="detrigger"):
        GuardPipeline(linear_classify, [ActivationSignal({0: [1]}, None)], None)


def test_a_suspected_image_never_gets_an_infected_label() -> None:
    from service.guard import Prediction, trusted_labels

    original = Prediction(np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])), np.zeros((3, 1)))
    restored = Prediction(np.log(np.array([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.9, 0.05, 0.05]])), np.zeros((3, 1)))
    backdoor = np.array([True, True, False])
    labels, confidence = trusted_labels(original, restored, backdoor, infected=[0])
    np.testing.assert_array_equal(labels, [1, 2, 0])  # suspects avoid label 0; the unsuspected keeps its own
    np.testing.assert_allclose(confidence, [0.3, 0.4, 0.6])
    # with nothing infected a suspect still never keeps its original label (the attacker's, if the trigger worked)
    plain, _ = trusted_labels(original, restored, backdoor, infected=[])
    np.testing.assert_array_equal(plain, [1, 0, 0])
    # where the original and the infected labels leave nothing, still never the original: the best of the others
    cornered, _ = trusted_labels(original, restored, backdoor, infected=[1, 2])
    np.testing.assert_array_equal(cornered, [1, 0, 0])


def test_a_result_gives_the_labels_of_each_source_it_can() -> None:
    """GuardResult.labels_from: the label policy over `label_source`, for calibration's and make cost's choice."""
    from service.guard import SOURCES, GuardResult, Prediction, label_source, trusted_labels

    def pred(p: list[list[float]]) -> Prediction:
        return Prediction(np.log(np.array(p)), np.zeros((len(p), 1)))

    original = pred([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    restored, repaired = pred([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7]]), pred([[0.5, 0.1, 0.4], [0.4, 0.5, 0.1]])
    flat = np.zeros(2)
    result = GuardResult(original, restored, np.zeros((2, 1, 2, 2)), {}, flat, flat > 0, flat, flat)
    assert result.sources() == ("restored",)  # no repaired model ran: the restoration is the only source
    result.repaired = repaired
    assert result.sources() == SOURCES
    flagged = np.array([True, True])
    for source in SOURCES:
        want, _ = trusted_labels(original, label_source(source, restored, repaired), flagged, [2])
        np.testing.assert_array_equal(result.labels_from(source, flagged, [2]), want)
    np.testing.assert_array_equal(result.labels_from("restored", flagged, [2]), [1, 0])
    np.testing.assert_array_equal(result.labels_from("repaired", flagged, [2]), [1, 0])
    np.testing.assert_array_equal(result.labels_from("repaired", flagged, []), [2, 0])
    np.testing.assert_array_equal(result.labels_from("both", ~flagged, [2]), [0, 1])  # unflagged: their own


def test_a_batch_run_in_chunks_equals_the_batch_run_whole() -> None:
    """Chunking bounds memory; it must not change a single number of any image's result."""
    x = RNG.random((11, 1, 28, 28)).astype(np.float32)
    x[::2, :, :6, :6] = 1.0
    levels = np.linspace(0, 0.9, 3)
    names = ("detrigger", "masked_ae", "strip", "activation")
    fusion = Fusion(levels, {n: np.array([-1.0, 0.0, 1.0]) for n in names}, dict.fromkeys(names, 1.0), 0.5)
    pipeline = make_pipeline(fusion)
    whole, chunked = pipeline.run(x), pipeline.run_in_chunks(x, 4)  # chunks of 4, 4 and 3 images
    for field in ("score", "backdoor", "labels", "confidence", "restored_images"):
        np.testing.assert_allclose(getattr(chunked, field), getattr(whole, field), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(chunked.original.logits, whole.original.logits, rtol=1e-6, atol=1e-6)
    for name in names:
        np.testing.assert_allclose(chunked.signals[name].score, whole.signals[name].score, rtol=1e-6, atol=1e-6)
        assert chunked.signals[name].evidence.keys() == whole.signals[name].evidence.keys()


def test_fisher_fusion_multiplies_the_clean_tail_probabilities() -> None:
    """fisher: 1 - exp(-sum of -log(1 - p)) = 1 - prod(1 - p); one signal alone gives its own percentile."""
    from service.guard import SignalResult

    levels = np.array([0.0, 0.25, 0.5])
    quantiles = {"a": np.array([0.0, 1.0, 2.0]), "b": np.array([10.0, 20.0, 30.0])}
    tails = {"a": 1.0, "b": 10.0}
    fisher, biggest = (Fusion(levels, quantiles, tails, threshold=0.9, rule=rule) for rule in ("fisher", "max"))
    results = {
        "a": SignalResult(np.array([0.5, 1.5, 3.0, -1.0]), np.zeros(4, bool)),
        "b": SignalResult(np.array([15.0, 10.0, 40.0, 25.0]), np.zeros(4, bool)),
    }
    p = {k: fisher.percentile(k, r.score) for k, r in results.items()}
    np.testing.assert_allclose(p["b"], [0.125, 0.0, 1 - 0.5 * np.exp(-1), 0.375])
    np.testing.assert_allclose(fisher.score(results), 1 - (1 - p["a"]) * (1 - p["b"]))
    np.testing.assert_allclose(biggest.score(results), np.maximum(p["a"], p["b"]))
    alone = Fusion(levels, {"a": quantiles["a"]}, {"a": 1.0}, threshold=0.9, rule="fisher")
    np.testing.assert_allclose(alone.score(results), p["a"])


def test_fisher_fusion_flags_two_signals_that_agree_where_max_does_not() -> None:
    """Each signal at its clean 90th percentile: max says 0.9, below a 0.95 threshold; together 0.99."""
    from service.guard import SignalResult

    levels, table = np.array([0.0, 0.9]), np.array([0.0, 1.0])
    results = {k: SignalResult(np.array([1.0]), np.zeros(1, bool)) for k in ("a", "b")}
    kw = {"levels": levels, "quantiles": {"a": table, "b": table}, "tail_scale": {"a": 1.0, "b": 1.0}}
    assert Fusion(**kw, threshold=0.95, rule="max").score(results)[0] == pytest.approx(0.9)
    assert Fusion(**kw, threshold=0.95, rule="fisher").score(results)[0] == pytest.approx(0.99)


def test_fusion_rule_from_the_manifest_defaults_to_max_for_older_bundles() -> None:
    fused = {"levels": [0.0, 0.9], "quantiles": {"a": [0.0, 1.0]}, "tail_scale": {"a": 1.0}, "threshold": 0.95}
    assert Fusion.from_manifest(fused).rule == "max"
    assert Fusion.from_manifest({**fused, "rule": "fisher"}).rule == "fisher"
    with pytest.raises(ValueError, match="fusion rule"):
        Fusion.from_manifest({**fused, "rule": "mean"})


def second_opinion_pipeline(
    calls: list[tuple[str, int, str]], side_thread: bool = False, small: GuardPipeline | None = None, tag: str = ""
) -> GuardPipeline:
    """The linear pipeline with the repaired and expert signals; `calls` records which model classified how many
    rows on which thread (each model's name, with `tag`)."""
    import threading

    from service.signals.expert import ExpertSignal
    from service.signals.repaired import RepairedSignal

    def model(name: str, corner: float) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
        def classify(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            calls.append((name + tag, len(images), threading.current_thread().name))
            seen = images.copy()
            seen[:, :, :6, :6] *= corner  # the repaired model ignores the top-left corner
            return linear_classify(seen)

        return classify

    signals = [DetriggerSignal(lambda x: x * 0.5), RepairedSignal(0.5), ExpertSignal(-0.1)]
    names = [s.name for s in signals]
    fusion = Fusion(
        np.linspace(0, 0.9, 3), {n: np.array([-1.0, 0.0, 1.0]) for n in names}, dict.fromkeys(names, 1.0), 0.5
    )
    models = {"repaired_classifier": model("repaired", 0.0), "backdoor_expert": model("expert", 0.5)}
    return GuardPipeline(model("classifier", 1.0), signals, fusion, models=models, side_thread=side_thread, small=small)


def test_a_side_thread_runs_the_other_models_beside_the_classifier_with_the_same_results() -> None:
    import threading

    x = RNG.random((6, 1, 28, 28)).astype(np.float32)
    x[:3, :, :6, :6] = 3.0  # a corner "trigger" on half of them
    side_calls: list[tuple[str, int, str]] = []
    plain_calls: list[tuple[str, int, str]] = []
    beside = second_opinion_pipeline(side_calls, side_thread=True).run(x)
    after = second_opinion_pipeline(plain_calls).run(x)
    me = threading.current_thread().name
    threads = {name: thread for name, _, thread in side_calls}
    assert threads["classifier"] == me
    assert threads["repaired"].startswith("guard_side") and threads["expert"].startswith("guard_side")
    assert {thread for _, _, thread in plain_calls} == {me}  # without it, all on the caller's thread
    assert sorted(side_calls) == sorted((*c[:2], threads[c[0]]) for c in plain_calls)  # the same calls, rows
    assert beside.backdoor.any() and not beside.backdoor.all()
    for field in ("score", "backdoor", "labels", "confidence"):
        np.testing.assert_array_equal(getattr(beside, field), getattr(after, field))
    for name in ("repaired", "expert"):
        np.testing.assert_array_equal(beside.signals[name].score, after.signals[name].score)
        np.testing.assert_array_equal(beside.percentiles[name], after.percentiles[name])
    np.testing.assert_array_equal(beside.repaired.logits, after.repaired.logits)


def test_small_batches_go_to_the_small_twin_with_what_was_set_on_the_pipeline() -> None:
    """Batches of at most SIDE_MAX_IMAGES run on the `small` twin (build_pipeline: Bundle.small's sessions), larger
    ones on the pipeline's own models; the metrics hook and a fusion set after building reach the twin too."""
    from dataclasses import replace

    from service.guard import SIDE_MAX_IMAGES

    calls: list[tuple[str, int, str]] = []
    twin = second_opinion_pipeline(calls, side_thread=True, tag=".small")
    pipeline = second_opinion_pipeline(calls, small=twin)
    stages: list[str] = []
    pipeline.on_stage = lambda stage, seconds: stages.append(stage)
    pipeline.fusion = replace(pipeline.fusion, threshold=1.0)  # nothing can pass it (GUARD_FUSED_THRESHOLD)
    assert twin.fusion is pipeline.fusion and twin.on_stage is pipeline.on_stage  # passed on as they are set
    for n in (1, SIDE_MAX_IMAGES, SIDE_MAX_IMAGES + 1):
        calls.clear()
        stages.clear()
        result = pipeline.run(RNG.random((n, 1, 28, 28)).astype(np.float32))
        small = n <= SIDE_MAX_IMAGES
        assert {name.endswith(".small") for name, _, _ in calls} == {small}
        assert "classifier" in stages and "repaired_classifier" in stages
        assert not result.backdoor.any() and len(result.labels) == n


def test_a_side_model_that_fails_fails_the_batch() -> None:
    """A model on the side thread that raises, or answers NaN, gives no verdict: the error reaches the caller."""
    from service.guard import NonFiniteScore

    x = RNG.random((2, 1, 28, 28)).astype(np.float32)
    pipeline = second_opinion_pipeline([], side_thread=True)

    def broken(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError("the side session died")

    pipeline.models["backdoor_expert"] = broken
    with pytest.raises(RuntimeError, match="side session died"):
        pipeline.run(x)
    pipeline.models["backdoor_expert"] = lambda images: (
        np.full((len(images), 10), np.nan),
        np.zeros((len(images), 16)),
    )
    with pytest.raises(NonFiniteScore, match="expert"):
        pipeline.run(x)


def test_a_prediction_computes_its_probabilities_once_and_they_are_read_only() -> None:
    from service.guard import Prediction

    p = Prediction(np.array([[0.0, 1.0], [2.0, 0.0]]), np.zeros((2, 1)))
    assert p.probs is p.probs and p.labels is p.labels and p.confidence is p.confidence
    np.testing.assert_allclose(p.probs, softmax(p.logits))
    with pytest.raises(ValueError, match="read-only"):
        p.probs[0, 0] = 1.0  # a cached array shared by every reader: nobody may change it in place
    with pytest.raises(ValueError, match="read-only"):
        p.labels[0] = 0


def test_fusion_levels_must_end_below_one() -> None:
    with pytest.raises(ValueError, match=r"end in \[0, 1\)"):
        Fusion(np.array([0.0, 1.0]), {"a": np.array([0.0, 1.0])}, {"a": 1.0}, threshold=0.5)
