"""POST /classify, health and model routes on the shipped bundle, through FastAPI's TestClient."""

import base64
import io
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app, load_bundle
from service.bundle import Bundle, BundleError
from service.settings import Settings
from tests.conftest import MODELS
from tests.service.conftest import files, png, wait_ready

pytestmark = pytest.mark.data


def test_verdicts_on_clean_and_triggered_images(client: TestClient, samples: dict) -> None:
    blobs = [png(p) for p in samples["clean"][:32]] + [png(p) for p in samples["triggered"][:32]]
    response = client.post("/classify", files=files(*blobs))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(range(64))
    clean, triggered = results[:32], results[32:]
    assert sum(r["backdoor"] for r in triggered) >= 31
    assert sum(r["backdoor"] for r in clean) <= 1
    assert sum(r["original"]["label"] == 0 for r in triggered) >= 31  # the backdoor works on the raw model
    true = samples["triggered_labels"][:32]
    assert sum(r["label"] == t for r, t in zip(triggered, true, strict=True)) >= 27  # restored to the truth
    assert sum(r["label"] == 0 for r in triggered) <= 2


def test_label_policy(client: TestClient, samples: dict) -> None:
    """Over HTTP, exactly what the guard pipeline gives in process: a clean verdict keeps the model's label; a
    flagged image gets its label source's best label other than the model's and any Neural Cleanse flagged."""
    from service.bundle import build_pipeline
    from service.preprocess import to_model_input

    pixels = np.concatenate([samples["clean"][:8], samples["triggered"][:8]])
    results = client.post("/classify", files=files(*map(png, pixels))).json()["results"]
    bundle = Bundle.load(MODELS)
    expected = build_pipeline(bundle).run(to_model_input(pixels))
    infected = bundle.manifest["neural_cleanse"]["flagged_labels"]
    assert sum(r["backdoor"] for r in results[8:]) >= 7
    for i, r in enumerate(results):
        assert (r["label"], r["backdoor"]) == (int(expected.labels[i]), bool(expected.backdoor[i]))
        assert r["confidence"] == pytest.approx(float(expected.confidence[i]), rel=1e-5)
        if r["backdoor"]:
            assert r["label"] != r["original"]["label"] and r["label"] not in infected
            assert r["label_source"] == bundle.manifest["thresholds"]["label_source"]["source"]
        else:
            assert (r["label"], r["confidence"], r["label_source"]) == (
                r["original"]["label"], r["original"]["confidence"], "original"
            )  # fmt: skip
        assert r["backdoor"] == (r["score"] > r["threshold"])
        p = np.array([s["percentile"] for s in r["signals"].values()])  # Fisher: 1 - prod(1 - p)
        assert r["score"] == pytest.approx(1 - np.prod(1 - p), abs=1e-9)


def test_response_shape(client: TestClient, samples: dict) -> None:
    body = client.post("/classify", files=files(png(samples["triggered"][0]))).json()
    manifest_name = client.get("/v2/models/fashion-mnist-kwon").json()["name"]
    assert body["model"]["name"] == manifest_name and len(body["model"]["sha256"]) == 64
    r = body["results"][0]
    assert r["filename"] == "img0.png"
    assert set(r) >= {"label", "class_name", "confidence", "backdoor", "score", "original", "restored", "signals",
                      "repaired", "label_source"}  # fmt: skip
    manifest = json.loads((MODELS / "manifest.json").read_text())
    assert list(r["signals"]) == list(manifest["signals"])  # every signal the bundle lists, in its order
    assert {"detrigger", "activation", "repaired", "expert", "mahalanobis"} == set(r["signals"])  # no STRIP: make cost
    assert r["backdoor"] and r["label_source"] == manifest["thresholds"]["label_source"]["source"]
    assert r["label"] != r["original"]["label"]  # a flagged image never keeps the label the model gave it
    assert {"label", "class_name", "confidence"} <= set(r["repaired"])
    assert {"score", "threshold", "triggered", "label", "agreement"} <= set(r["signals"]["expert"])
    assert {"score", "threshold", "triggered", "percentile"} <= set(r["signals"]["mahalanobis"])
    assert {"label", "class_name", "triggered"} <= set(r["signals"]["detrigger"])
    assert {"score", "threshold", "triggered"} <= set(r["signals"]["activation"])
    assert "image" not in r["restored"]


def test_include_restored_returns_the_de_triggered_png(client: TestClient, samples: dict) -> None:
    r = client.post("/classify?include=restored", files=files(png(samples["triggered"][0]))).json()["results"][0]
    image = Image.open(io.BytesIO(base64.b64decode(r["restored"]["image"])))
    assert image.size == (28, 28) and image.mode == "L"
    pixels = np.asarray(image)
    assert pixels[1:5, 1:5].mean() < 200  # the white square is gone
    assert np.abs(pixels.astype(int) - samples["triggered"][0]).mean() < 20  # the rest is kept


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP"])
def test_other_formats_and_sizes(client: TestClient, samples: dict, fmt: str) -> None:
    big = Image.fromarray(samples["clean"][3]).resize((112, 112)).convert("RGB")
    buffer = io.BytesIO()
    big.save(buffer, format=fmt)
    response = client.post("/classify", files=[("files", ("x", buffer.getvalue(), "application/octet-stream"))])
    assert response.status_code == 200
    assert response.json()["results"][0]["label"] == samples["clean_labels"][3]


def error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]


def test_bad_images_are_400_and_name_the_file(client: TestClient, samples: dict) -> None:
    good = png(samples["clean"][0])
    cases = {
        b"definitely not an image": "not a PNG",
        good[: len(good) // 2]: "corrupt",
        b"": "empty",
    }
    for blob, words in cases.items():
        e = error(client.post("/classify", files=files(good, blob)))
        assert e["code"] == "bad_image" and words in e["message"] and e["file_index"] == 1
        assert "img1.png" in e["message"]
    tiff = io.BytesIO()
    Image.new("L", (28, 28)).save(tiff, format="TIFF")  # a format the guard does not take
    response = client.post("/classify", files=files(tiff.getvalue()))
    assert response.status_code == 400 and error(response)["file_index"] == 0


def test_wrong_content_type_is_415(client: TestClient) -> None:
    for response in (client.post("/classify", json={"files": []}), client.post("/classify", content=b"x")):
        assert response.status_code == 415 and error(response)["code"] == "unsupported_media_type"


def test_no_files_is_422(client: TestClient) -> None:
    response = client.post("/classify", data={"other": "field"}, files=[("other", ("a.png", b"x", "image/png"))])
    assert response.status_code == 422 and error(response)["code"] == "no_files"


@pytest.fixture(scope="module")
def strict_client() -> TestClient:
    s = Settings(models_dir=MODELS, max_files=3, max_file_bytes=2000, max_pixels=200 * 200, api_key="s3cret")
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        yield c


def test_upload_limits_are_413(strict_client: TestClient, samples: dict) -> None:
    key = {"X-API-Key": "s3cret"}
    small = png(samples["clean"][0])
    assert strict_client.post("/classify", files=files(small, small, small), headers=key).status_code == 200
    e = error(strict_client.post("/classify", files=files(*[small] * 4), headers=key))
    assert e["code"] == "too_many_files"
    noisy = png(np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.uint8))
    assert len(noisy) > 2000
    e = error(strict_client.post("/classify", files=files(small, noisy), headers=key))
    assert e["code"] == "too_large" and e["file_index"] == 1
    huge = png(np.zeros((300, 300), np.uint8))  # compresses to little, decodes to 90,000 pixels
    assert len(huge) < 2000
    e = error(strict_client.post("/classify", files=files(huge), headers=key))
    assert e["code"] == "too_large" and "pixels" in e["message"]


def test_api_key(strict_client: TestClient, samples: dict) -> None:
    blob = files(png(samples["clean"][0]))
    assert strict_client.post("/classify", files=blob).status_code == 401
    assert strict_client.post("/classify", files=blob, headers={"X-API-Key": "wrong"}).status_code == 401
    assert strict_client.get("/v2/health/ready").status_code == 200  # health needs no key


def test_decompression_bomb_guard(client: TestClient) -> None:
    """Pillow's guard stays on: a PNG declaring an absurd size is refused before it is decoded."""
    header = png(np.zeros((1, 1), np.uint8))
    # Rewrite the IHDR width/height of a 1x1 PNG to 60000 x 60000 (3.6 GPixel); the CRC no longer matches.
    bomb = header[:16] + (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big") + header[24:]
    response = client.post("/classify", files=files(bomb))
    assert response.status_code in (400, 413)


def test_model_metadata(client: TestClient) -> None:
    meta = client.get("/v2/models/fashion-mnist-kwon").json()
    assert meta["class_names"][0] == "T-shirt/top"
    assert meta["inputs"][0]["name"] == "images"
    assert meta["neural_cleanse"]["flagged_labels"] == [0]
    assert len(meta["neural_cleanse"]["anomaly_index"]) == 10
    assert {"detrigger", "activation", "repaired", "expert", "mahalanobis", "fused"} <= set(meta["thresholds"])
    fused = meta["thresholds"]["fused"]  # and on guard_fused_surprise's scale
    assert fused["surprise"] == pytest.approx(-np.log1p(-fused["threshold"]))
    assert client.get("/v2/models/other").status_code == 404


def test_server_metadata_names_the_guarded_model(client: TestClient) -> None:
    from service import __version__

    server = client.get("/v2").json()
    assert server == {
        "name": "backdoor-guard",
        "version": __version__,
        "extensions": ["binary_tensor_data"],  # Triton's name for the binary tensors /infer takes and gives
        "models": ["fashion-mnist-kwon"],
    }
    assert client.get(f"/v2/models/{server['models'][0]}").status_code == 200


def test_openapi_declares_every_status(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    declared = set(spec["paths"]["/classify"]["post"]["responses"])
    assert {"200", "400", "401", "413", "415", "422", "503"} <= declared
    assert "multipart/form-data" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


class GatedBundle:
    """A loader whose classifier blocks until the test opens the gate: holds the service in warm-up."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def __call__(self, settings: Settings) -> Bundle:
        bundle = load_bundle(settings)
        gate = self.gate

        class Gated:  # the classifier's session, both of them (`small`: batches of a few images)
            def __init__(self, session: Any) -> None:
                self.session = session

            def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
                gate.wait(timeout=30)
                return self.session.run(outputs, feed)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.session, name)

        for sessions in (bundle.sessions, bundle.small):  # `small` is empty with a single ONNX Runtime thread
            if "classifier" in sessions:
                sessions["classifier"] = Gated(sessions["classifier"])
        return bundle


def test_ready_only_after_warm_up(samples: dict) -> None:
    loader = GatedBundle()
    with TestClient(create_app(Settings(models_dir=MODELS), loader)) as c:
        assert c.get("/v2/health/live").status_code == 200
        response = c.get("/v2/health/ready")
        assert response.status_code == 503 and response.json()["status"] == "not_ready"
        e = error(c.post("/classify", files=files(png(samples["clean"][0]))))
        assert e["code"] == "not_ready"
        assert "guard_ready 0.0" in c.get("/metrics").text
        loader.gate.set()
        wait_ready(c)
        assert c.post("/classify", files=files(png(samples["clean"][0]))).status_code == 200
        assert "guard_ready 1.0" in c.get("/metrics").text


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_overload_is_503_not_an_unbounded_queue(samples: dict) -> None:
    loader = GatedBundle()
    with TestClient(create_app(Settings(models_dir=MODELS, max_queue=10, max_files=4), loader)) as c:
        runtime = c.app.state.runtime  # type: ignore[attr-defined]
        wait_for(lambda: runtime.batcher.pending == 8)  # the warm-up's 8 images, held at the gate
        runtime.ready = True  # let requests in while the gate holds the queue full
        blob = png(samples["clean"][0])
        response = c.post("/classify", files=files(blob, blob, blob))  # 8 + 3 > 10: refused after reading
        assert response.status_code == 503 and error(response)["code"] == "overloaded"
        runtime.batcher.pending += 2  # 10 of 10: refused before reading the body
        response = c.post("/classify", files=files(blob))
        runtime.batcher.pending -= 2
        assert response.status_code == 503 and error(response)["code"] == "overloaded"
        assert response.headers["retry-after"] == "1"
        answers: list[int] = []
        fits = threading.Thread(target=lambda: answers.append(c.post("/classify", files=files(blob, blob)).status_code))
        fits.start()  # 8 + 2 = 10: queued, not refused
        wait_for(lambda: runtime.batcher.pending == 10)
        loader.gate.set()
        fits.join(timeout=30)
        assert answers == [200]
        wait_for(lambda: runtime.batcher.pending == 0)  # and the warm-up's single image, for the twin


def test_not_ready_while_the_small_batch_twin_cannot_answer() -> None:
    """The warm-up runs one image through the twin too (other sessions of the same models): where that path gives
    no finite verdict, the service stays not ready, though the 8-image batch passed on the bundle's own sessions."""

    class NaNs:
        def __init__(self, session: Any) -> None:
            self.session = session

        def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            return [np.full_like(out, np.nan) for out in self.session.run(outputs, feed)]

        def __getattr__(self, name: str) -> Any:
            return getattr(self.session, name)

    def broken_twin(settings: Settings) -> Bundle:
        bundle = load_bundle(settings)
        bundle.small["backdoor_expert"] = NaNs(bundle.small["backdoor_expert"])
        return bundle

    with TestClient(create_app(Settings(models_dir=MODELS, ort_threads=2), broken_twin)) as c:
        runtime = c.app.state.runtime  # type: ignore[attr-defined]
        wait_for(lambda: runtime.warmup_error is not None)
        assert "expert" in runtime.warmup_error and not runtime.ready
        response = c.get("/v2/health/ready")
        assert response.status_code == 503


def test_refuses_to_start_on_a_tampered_bundle(tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(MODELS, copy)
    with (copy / "classifier.onnx").open("r+b") as f:
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleError, match="classifier"), TestClient(create_app(Settings(models_dir=copy))):
        pass


def test_405_names_the_allowed_methods(client: TestClient) -> None:
    response = client.get("/classify")
    assert response.status_code == 405 and error(response)["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"


def test_openapi_bounds_the_number_of_files(strict_client: TestClient, client: TestClient) -> None:
    """A request that is valid by the schema is not refused for its number of files (schemathesis relies on it)."""
    for c, limit in ((strict_client, 3), (client, 64)):
        body = c.get("/openapi.json").json()["paths"]["/classify"]["post"]["requestBody"]
        schema = body["content"]["multipart/form-data"]["schema"]["properties"]["files"]
        assert schema["minItems"] == 1 and schema["maxItems"] == limit


def test_limits_that_contradict_each_other_are_refused() -> None:
    with pytest.raises(ValueError, match=r"GUARD_MAX_QUEUE .*GUARD_MAX_FILES"):
        Settings(models_dir=MODELS, max_queue=32)  # 64 files could never be admitted
    with pytest.raises(ValueError, match="warm-up"):
        Settings(models_dir=MODELS, max_queue=4, max_files=4)  # the 8-image warm-up could never run
    with pytest.raises(ValueError, match="GUARD_DECODE_BUDGET_PIXELS"):
        Settings(models_dir=MODELS, decode_budget_pixels=1000)
    Settings(models_dir=MODELS, max_queue=4, max_files=4, max_batch=4)  # a warm-up of 4 fits


def test_request_dependencies_run_on_the_event_loop(
    client: TestClient, samples: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI runs a plain `def` dependency in its thread pool: a thread hop on every request for what is a
    dictionary lookup. The guarded request path's dependencies are `async`, so none costs one."""
    import fastapi.dependencies.utils

    hops: list[Any] = []
    real = fastapi.dependencies.utils.run_in_threadpool

    async def spy(func: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(func)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(fastapi.dependencies.utils, "run_in_threadpool", spy)
    r = client.post("/classify", files=files(png(samples["clean"][0])))
    assert r.status_code == 200, r.text
    assert hops == []
