"""GUARD_SIGNALS=none: plain inference through the same stack, with no verdict (null, never a silent clean)."""

from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.bundle import Bundle
from service.guard import NonFiniteScore, PlainPipeline
from service.settings import Settings
from tests.conftest import MODELS
from tests.service.conftest import files, png, wait_ready

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def plain() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(models_dir=MODELS, signals="none"))) as c:
        wait_ready(c)
        yield c


def test_the_guard_off_gives_the_models_label_and_no_verdict(plain: TestClient, samples: dict) -> None:
    blobs = [png(p) for p in samples["clean"][:4]] + [png(p) for p in samples["triggered"][:4]]
    body = plain.post("/classify", files=files(*blobs)).json()
    assert body["guard"] == "off"
    pixels = np.concatenate([samples["clean"][:4], samples["triggered"][:4]])
    logits, _ = Bundle.load(MODELS).classify(pixels[:, None] / np.float32(255))
    for r, own in zip(body["results"], logits.argmax(1), strict=True):
        assert r["label"] == r["original"]["label"] == own  # triggered ones keep the attacker's label: no guard
        assert r["backdoor"] is None and r["score"] is None and r["threshold"] is None
        assert r["signals"] == {} and r["restored"] is None and r["label_source"] == "original"
    assert [r["label"] for r in body["results"][4:]] == [0, 0, 0, 0]  # the backdoor works, unguarded


def test_the_guard_off_says_so_in_metadata_and_metrics(plain: TestClient, samples: dict) -> None:
    plain.post("/classify", files=files(png(samples["clean"][0])))
    meta = plain.get("/v2/models/" + plain.get("/v2").json()["models"][0]).json()
    assert meta["thresholds"]["guard"] == "off"
    text = plain.get("/metrics").text
    assert 'guard_images_total{verdict="unguarded"}' in text
    assert "guard_signal_triggers_total{" not in text


def test_the_guard_on_answers_guard_on(client: TestClient, samples: dict) -> None:
    assert client.post("/classify", files=files(png(samples["clean"][0]))).json()["guard"] == "on"


def test_plain_pipeline_is_one_classifier_call_and_fails_on_non_finite_logits() -> None:
    calls: list[int] = []

    def classify(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(images))
        logits = np.tile(np.arange(10, dtype=np.float32), (len(images), 1))
        logits[images[:, 0, 0, 0] > 0.5] = np.nan
        return logits, logits

    pipeline = PlainPipeline(classify)
    x = np.zeros((5, 1, 28, 28), np.float32)
    result = pipeline.run_in_chunks(x, 8)
    assert calls == [5] and (result.labels == 9).all() and not result.backdoor.any() and result.signals == {}
    x[3, 0, 0, 0] = 1.0
    with pytest.raises(NonFiniteScore):
        pipeline.run(x)
