import io
import time
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.conftest import MODELS
from training.attacks import PRESETS, triggered_pixels, victims


def png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def files(*blobs: bytes, name: str = "img") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{name}{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "the service never became ready"
        time.sleep(0.02)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(models_dir=MODELS)


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="session")
def samples(fashion_mnist) -> dict[str, np.ndarray]:
    """uint8 pixels: 64 clean test images and 64 triggered (kwon) non-target ones, with true labels."""
    test = fashion_mnist.test
    idx = victims(test.labels[:200], PRESETS["kwon"])[:64]
    clean = test.images[:64]
    triggered = triggered_pixels(test.images[idx], PRESETS["kwon"])
    return {
        "clean": clean,
        "clean_labels": test.labels[:64],
        "triggered": triggered,
        "triggered_labels": test.labels[idx],
    }
