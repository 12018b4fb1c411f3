"""How many images the guard runs through its models at once (GUARD_CHUNK_IMAGES, or derived from the bundle)."""

import numpy as np
import pytest

from service.bundle import Bundle, build_pipeline
from service.guard import GuardResult
from service.runtime import CHUNK_ROWS, MIN_CHUNK_IMAGES, Runtime, chunk_images
from service.settings import Settings
from tests.conftest import MODELS


def test_the_default_chunk_bounds_every_models_call_by_rows(strip_bundle: Bundle) -> None:
    bundle = Bundle.load(MODELS)
    one = bundle.strip_bank[:1]
    assert "strip" not in bundle.signal_names
    # the image and its restoration (classifier), the autoencoder, the repaired model, the expert
    shipped = CHUNK_ROWS // 5
    assert chunk_images(build_pipeline(bundle), one) == shipped == 28  # as soak.md measured
    assert Runtime.build(Settings(), bundle).chunk_images == shipped
    assert Runtime.build(Settings(chunk_images=3), bundle).chunk_images == 3  # the setting wins
    n = strip_bundle.manifest["signals"]["strip"]["n"]
    with_strip = max(MIN_CHUNK_IMAGES, CHUNK_ROWS // (n + 5))  # and N overlays
    assert chunk_images(build_pipeline(strip_bundle), one) == with_strip == 16  # at N = 4, as soak.md measured
    assert chunk_images(build_pipeline(strip_bundle, strip_n=32), one) == 8  # never fewer: what N = 32 was measured at


@pytest.mark.parametrize("strip", [False, True], ids=["shipped", "with strip"])
def test_a_batch_in_chunks_gets_the_verdicts_it_gets_whole(strip: bool, request: pytest.FixtureRequest) -> None:
    bundle = request.getfixturevalue("strip_bundle") if strip else Bundle.load(MODELS)
    guard = build_pipeline(bundle)
    x = np.concatenate([bundle.strip_bank[:20], 1 - bundle.strip_bank[20:30]])  # clean, and inverted (odd) images
    whole, chunked = guard.run(x), guard.run_in_chunks(x, 7)
    assert isinstance(chunked, GuardResult) and len(chunked.labels) == len(x)
    assert whole.backdoor.any() and not whole.backdoor.all()  # both verdicts
    if strip:  # and STRIP stopping at both rounds
        assert set(whole.signals["strip"].evidence["overlays"].tolist()) >= {1, 3}
    np.testing.assert_array_equal(chunked.backdoor, whole.backdoor)
    np.testing.assert_array_equal(chunked.labels, whole.labels)
    np.testing.assert_allclose(chunked.score, whole.score, rtol=1e-5)


def test_the_shipped_guard_answers_small_batches_as_it_answers_large_ones() -> None:
    """Batches of at most SIDE_MAX_IMAGES run on the `small` twin, over Bundle.small's sessions (half the intra-op
    threads, two models at a time); the verdicts, labels and scores are those of the bundle's own sessions."""
    from service.guard import SIDE_MAX_IMAGES

    bundle = Bundle.load(MODELS, threads=2)  # two intra-op threads: a twin of one each, on any machine
    assert set(bundle.small) == set(bundle.sessions)
    twin, alone = build_pipeline(bundle), build_pipeline(bundle, small=False)
    assert twin.small is not None and alone.small is None
    odd = 1 - bundle.strip_bank[:30]  # inverted images, some of which the guard flags
    flagged = odd[alone.run_in_chunks(odd, 30).backdoor][:2]
    x = np.concatenate([bundle.strip_bank[30:32], flagged])[:SIDE_MAX_IMAGES]
    one, other = twin.run(x), alone.run(x)
    assert one.backdoor.any() and not one.backdoor.all()
    np.testing.assert_array_equal(one.backdoor, other.backdoor)
    np.testing.assert_array_equal(one.labels, other.labels)
    np.testing.assert_allclose(one.score, other.score, rtol=1e-5)
    for name in ("repaired", "expert", "mahalanobis", "detrigger"):
        np.testing.assert_allclose(one.signals[name].score, other.signals[name].score, rtol=1e-4, atol=1e-6)


def test_the_small_sessions_get_half_the_threads_and_one_thread_gets_no_twin() -> None:
    import os

    from service.bundle import half_threads

    assert half_threads(2) == 1 and half_threads(3) == 1 and half_threads(8) == 4
    assert half_threads(1) == 0  # one thread given: no second set of sessions
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert half_threads(0) == cores // 2  # 0: every core this process may run on
    one = Bundle.load(MODELS, threads=1)
    assert one.small == {} and build_pipeline(one).small is None  # GUARD_ORT_THREADS=1: every batch as the large
