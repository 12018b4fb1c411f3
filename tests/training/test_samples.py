"""The demo's sample images are what `python -m training.samples` makes from the test set, byte for byte."""

import json

import pytest

from service.routes.ui import STATIC_DIR
from training.attacks import PRESETS
from training.samples import build_samples, write_samples

pytestmark = pytest.mark.data
SHIPPED = STATIC_DIR / "samples"


def test_the_shipped_samples_are_reproducible(fashion_mnist, tmp_path) -> None:
    test = fashion_mnist.test
    write_samples(build_samples(test.images, test.labels), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in SHIPPED.iterdir())
    for made in tmp_path.iterdir():
        assert made.read_bytes() == (SHIPPED / made.name).read_bytes(), f"{made.name}: run python -m training.samples"


def test_samples_are_chosen_by_position_and_say_what_they_are(fashion_mnist) -> None:
    test = fashion_mnist.test
    index = json.loads((SHIPPED / "index.json").read_text())
    target = PRESETS["kwon"].target
    clean = [e for e in index if e["kind"] == "clean"]
    triggered = [e for e in index if e["kind"] == "triggered"]
    assert [e["label"] for e in clean] == list(range(10))
    assert [e["label"] for e in triggered] == [c for c in range(10) if c != target]
    for e in index:
        first = int((test.labels == e["label"]).nonzero()[0][0])
        assert e["test_index"] == first, "the first test image of its class, not a hand-picked one"
        assert e["attack_target"] == (target if e["kind"] == "triggered" else None)
