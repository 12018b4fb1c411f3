"""STRIP's early exit (GuardPipeline._finish_strip): fewer overlays, the same verdict on every image."""

import numpy as np
import pytest

from service.bundle import Bundle, build_pipeline
from service.guard import GuardPipeline, NonFiniteScore
from service.preprocess import to_model_input
from service.signals.strip import StripSignal
from training.attacks import PRESETS, triggered_pixels, victims

pytestmark = pytest.mark.data


class Counted:
    """The bundle's classifier, counting the rows it is given."""

    def __init__(self, classify):
        self.classify, self.rows = classify, 0

    def __call__(self, x: np.ndarray):
        self.rows += len(x)
        return self.classify(x)


def guards(bundle: Bundle) -> tuple[GuardPipeline, GuardPipeline, Counted, Counted]:
    staged, full = build_pipeline(bundle), build_pipeline(bundle, early_exit=False)
    counts = Counted(bundle.classify), Counted(bundle.classify)
    for guard, count in zip((staged, full), counts, strict=True):
        guard.classify = guard.models["classifier"] = count
    return staged, full, *counts


@pytest.fixture(scope="module")
def images(fashion_mnist) -> dict[str, np.ndarray]:
    """Clean test images and victims of three triggers: the shipped kwon patch, and two the bundle never saw."""
    test = fashion_mnist.test
    sets = {"clean": test.images[:400]}
    for name in ("kwon", "key", "sig"):
        idx = victims(test.labels[:400], PRESETS[name])[:150]
        sets[name] = triggered_pixels(test.images[idx], PRESETS[name])
    return {k: to_model_input(v) for k, v in sets.items()}


def test_the_verdict_labels_and_decided_scores_equal_the_full_run(images: dict[str, np.ndarray], strip_bundle) -> None:
    staged, full, staged_rows, full_rows = guards(strip_bundle)
    n = next(s for s in full.signals if isinstance(s, StripSignal)).n
    threshold = full.fusion.threshold
    for name, x in images.items():
        a, b = staged.run(x), full.run(x)
        np.testing.assert_array_equal(a.backdoor, b.backdoor, err_msg=name)
        np.testing.assert_array_equal(a.labels, b.labels, err_msg=name)
        # a stopped image's score, from its partial entropy, lies on the side of the threshold of its verdict
        assert ((a.score > threshold) == a.backdoor).all()
        overlays = a.signals["strip"].evidence["overlays"]
        complete = overlays == n
        np.testing.assert_allclose(a.signals["strip"].score[complete], b.signals["strip"].score[complete], atol=1e-6)
        np.testing.assert_allclose(a.score[complete], b.score[complete], atol=1e-9)
        for other in ("detrigger", "activation", "repaired", "expert", "mahalanobis"):
            np.testing.assert_array_equal(a.signals[other].score, b.signals[other].score)
        assert (b.signals["strip"].evidence["overlays"] == n).all()
        if name in ("clean", "kwon"):
            assert (overlays < n).mean() > 0.6, f"{name}: most images should stop early"
    assert staged_rows.rows < 0.6 * full_rows.rows


def test_an_image_that_cannot_be_scored_never_stops_early_and_fails_the_batch(
    images: dict[str, np.ndarray], strip_bundle
) -> None:
    staged, _, _, _ = guards(strip_bundle)
    x = images["clean"][:4].copy()
    x[2] = np.nan
    with pytest.raises(NonFiniteScore, match=r"image\(s\) \[2\]"):
        staged.run(x)


def test_the_score_range_holds_every_way_the_remaining_overlays_can_go() -> None:
    bank = np.random.default_rng(0).random((16, 1, 4, 4)).astype(np.float32)
    strip = StripSignal(bank, 16, "sum", threshold=None, rounds=(2, 8))
    assert strip.rounds == (2, 8, 16)
    rng = np.random.default_rng(1)
    entropies = rng.random((1000, 16)) * np.log2(10)
    entropies[:100, 2:] = 0.0  # the extremes: every remaining overlay at 0 bits, or at log2(10)
    entropies[100:200, 2:] = np.log2(10)
    for done in (2, 8):
        low, high = strip.score_range(entropies[:, :done].sum(axis=1), np.full(1000, done), 10)
        final = -entropies.mean(axis=1)
        assert (low <= final + 1e-12).all() and (final <= high + 1e-12).all()
        assert (low <= -entropies[:, :done].mean(axis=1)).all() and (-entropies[:, :done].mean(axis=1) <= high).all()


def test_rounds_are_checked_and_an_n_below_them_runs_in_one_round() -> None:
    bank = np.zeros((16, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="increasing"):
        StripSignal(bank, 16, "sum", None, rounds=(8, 2))
    with pytest.raises(ValueError, match="increasing"):
        StripSignal(bank, 16, "sum", None, rounds=(0, 4))
    assert StripSignal(bank, 1, "sum", None, rounds=(1, 3)).rounds == (1,)
    assert StripSignal(bank, 4, "sum", None, rounds=(1, 3, 8)).rounds == (1, 3, 4)
