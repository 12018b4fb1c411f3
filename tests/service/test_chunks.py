"""How many images the guard runs through its models at once (GUARD_CHUNK_IMAGES, or derived from the bundle)."""

import numpy as np

from service.bundle import Bundle, build_pipeline
from service.guard import GuardResult
from service.runtime import CHUNK_ROWS, MIN_CHUNK_IMAGES, Runtime, chunk_images
from service.settings import Settings
from tests.conftest import MODELS


def test_the_default_chunk_bounds_the_classifier_call_by_rows_whatever_strip_n() -> None:
    bundle = Bundle.load(MODELS)
    one = bundle.strip_bank[:1]
    n = bundle.manifest["signals"]["strip"]["n"]
    default = max(MIN_CHUNK_IMAGES, CHUNK_ROWS // (n + 2))  # the image, its restoration, N overlays
    assert chunk_images(build_pipeline(bundle), one) == default == 16  # at the shipped N = 4, as soak.md measured
    assert chunk_images(build_pipeline(bundle, strip_n=32), one) == 8  # never fewer: what N = 32 was measured at
    assert Runtime.build(Settings(), bundle).chunk_images == default
    assert Runtime.build(Settings(chunk_images=3), bundle).chunk_images == 3  # the setting wins


def test_a_batch_in_chunks_gets_the_verdicts_it_gets_whole() -> None:
    bundle = Bundle.load(MODELS)
    guard = build_pipeline(bundle)
    x = np.concatenate([bundle.strip_bank[:20], 1 - bundle.strip_bank[20:30]])  # clean, and inverted (odd) images
    whole, chunked = guard.run(x), guard.run_in_chunks(x, 7)
    assert isinstance(chunked, GuardResult) and len(chunked.labels) == len(x)
    assert whole.backdoor.any() and not whole.backdoor.all()  # both verdicts, and STRIP stopping at both rounds
    assert set(whole.signals["strip"].evidence["overlays"].tolist()) >= {1, 3}
    np.testing.assert_array_equal(chunked.backdoor, whole.backdoor)
    np.testing.assert_array_equal(chunked.labels, whole.labels)
    np.testing.assert_allclose(chunked.score, whole.score, rtol=1e-5)
