"""POST /v2/models/{name}/infer: the Open Inference Protocol, driven by Triton's own client and by hand."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.bundle import Bundle, build_pipeline
from service.preprocess import to_model_input
from service.settings import Settings
from tests.conftest import MODELS
from tests.live import LiveService, live_service
from tests.service.conftest import files, png, wait_ready

pytestmark = pytest.mark.data
NAME = json.loads((MODELS / "manifest.json").read_text())["name"]
INFER = f"/v2/models/{NAME}/infer"


def tensor(x: np.ndarray, datatype: str = "FP32") -> dict:
    return {"name": "images", "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}


def outputs(body: dict) -> dict[str, list]:
    return {o["name"]: o["data"] for o in body["outputs"]}


@pytest.fixture(scope="module")
def batch(samples: dict) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels: 8 clean and 8 triggered test images, and which are triggered."""
    pixels = np.concatenate([samples["clean"][:8], samples["triggered"][:8]])
    return pixels, np.repeat([False, True], 8)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    with live_service({"GUARD_MODELS_DIR": str(MODELS)}) as service:
        yield service


def test_tritonclient_gets_the_labels_and_verdicts_classify_gives(
    live: LiveService, client: TestClient, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    import tritonclient.http as triton

    pixels, triggered = batch
    answers = client.post("/classify", files=files(*(png(p) for p in pixels))).json()["results"]
    in_process = build_pipeline(Bundle.load(MODELS)).run(to_model_input(pixels))  # each signal's own score
    triton_client = triton.InferenceServerClient(live.url.removeprefix("http://"))
    assert triton_client.is_server_live() and triton_client.is_server_ready() and triton_client.is_model_ready(NAME)
    x = to_model_input(pixels)
    for binary in (True, False):  # the binary tensor extension (the client's default), and plain JSON
        images = triton.InferInput("images", list(x.shape), "FP32")
        images.set_data_from_numpy(x, binary_data=binary)
        asked = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("label", "backdoor", "score",
                 "original_label", "restored_label", "mahalanobis_score")]  # fmt: skip
        result = triton_client.infer(NAME, [images], outputs=asked, request_id="r1")
        assert result.get_response()["id"] == "r1"
        assert result.as_numpy("label").tolist() == [r["label"] for r in answers]
        assert result.as_numpy("backdoor").tolist() == [r["backdoor"] for r in answers]
        assert result.as_numpy("original_label").tolist() == [r["original"]["label"] for r in answers]
        assert result.as_numpy("restored_label").tolist() == [r["restored"]["label"] for r in answers]
        np.testing.assert_allclose(result.as_numpy("score"), [r["score"] for r in answers], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(result.as_numpy("mahalanobis_score"), in_process.signals["mahalanobis"].score,
                                   rtol=1e-5)  # fmt: skip
    assert result.as_numpy("backdoor").tolist() == triggered.tolist()  # and the guard is right about them
    # no outputs named: every output, binary; UINT8 pixels as they are
    images = triton.InferInput("images", list(pixels[:, None].shape), "UINT8")
    images.set_data_from_numpy(pixels[:, None])
    result = triton_client.infer(NAME, [images])
    names = {o["name"] for o in result.get_response()["outputs"]}
    assert {"label", "confidence", "backdoor", "score", "original_label", "restored_label", "repaired_label"} <= names
    assert {"detrigger_score", "activation_score", "repaired_score", "expert_score", "mahalanobis_score"} <= names
    assert result.as_numpy("label").tolist() == [r["label"] for r in answers]
    # the model's one version, and a refusal the client can read (it fails to print an error that is not a string)
    assert triton_client.is_model_ready(NAME, model_version="1") and not triton_client.is_model_ready(NAME, "2")
    assert (
        triton_client.infer(NAME, [images], model_version="1").as_numpy("label").tolist()
        == result.as_numpy("label").tolist()
    )
    wrong = triton.InferInput("images", [1, 1, 28, 27], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 1, 28, 27), np.uint8))
    with pytest.raises(triton.InferenceServerException) as refused:
        triton_client.infer(NAME, [wrong])
    assert "this model takes [B, 1, 28, 28]" in str(refused.value) and refused.value.status() == "400"


def test_json_tensors_nested_or_flat_give_the_same_answer(client: TestClient, batch: tuple) -> None:
    x = to_model_input(batch[0][:3])
    flat = client.post(INFER, json={"inputs": [tensor(x)], "outputs": [{"name": "label"}, {"name": "backdoor"}]})
    nested = client.post(INFER, json={"inputs": [{**tensor(x), "data": x.tolist()}], "outputs": [{"name": "label"}]})
    assert flat.status_code == nested.status_code == 200, flat.text
    body = flat.json()
    assert body["model_name"] == NAME and [o["name"] for o in body["outputs"]] == ["label", "backdoor"]
    assert body["outputs"][0] == {"name": "label", "datatype": "INT64", "shape": [3], "data": outputs(body)["label"]}
    assert outputs(nested.json())["label"] == outputs(body)["label"]


BAD = [
    ({"inputs": []}, 400, "exactly one input"),
    ({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}, 400, "named"),
    ({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP16", "data": [0.0] * 784}]}, 400, "FP16"),
    ({"inputs": [{"name": "images", "shape": [1, 3, 28, 28], "datatype": "FP32", "data": [0.0] * 2352}]}, 400,
     "shape"),
    ({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 783}]}, 400,
     "783 values"),
    ({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 783 + [1.5]}]}, 400,
     "in [0, 1]"),
    ({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 783 + ["x"]}]}, 400,
     "number"),
    ({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 783 + [256]}]}, 400,
     "0..255"),
    ({"inputs": [{"name": "images", "shape": [65, 1, 28, 28], "datatype": "UINT8", "data": [0] * 65 * 784}]}, 413,
     "at most 64"),
    ({"inputs": [tensor(np.zeros((1, 1, 28, 28), np.float32))], "outputs": [{"name": "logits"}]}, 400, "no output"),
    ({"inputs": [tensor(np.zeros((1, 1, 28, 28), np.float32))], "outputs": [{"name": ["label"]}]}, 400,
     "no output ['label']"),
    ({"inputs": [tensor(np.zeros((1, 1, 28, 28), np.float32))], "outputs": [{"name": {}}]}, 400, "no output {}"),
    ({"inputs": [tensor(np.zeros((1, 1, 28, 28), np.float32))], "outputs": [{"name": "label", "parameters": [1]}]},
     400, "parameters must be an object"),
]  # fmt: skip


@pytest.mark.parametrize(("request_body", "status", "message"), BAD, ids=[m for _, _, m in BAD])
def test_a_request_the_guard_cannot_trust_is_refused(
    client: TestClient, request_body: dict, status: int, message: str
) -> None:
    response = client.post(INFER, json=request_body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_nested_data_must_follow_the_shape(client: TestClient, batch: tuple) -> None:
    """Nested data is read only as its shape says: ragged lists, or the same values nested with the axes in another
    order, add up to the right count but would be read as other images, so they are refused, not judged."""
    x = to_model_input(batch[0][8:10])  # two triggered images
    good = client.post(INFER, json={"inputs": [{**tensor(x), "data": x.tolist()}], "outputs": [{"name": "label"}]})
    assert good.status_code == 200, good.text
    flat = x.ravel().tolist()
    wrong = [
        x.reshape(28, 2, 1, 28).tolist(),  # the right count, nested as another shape
        [flat[:1567], flat[1567:]],  # ragged
        [x[0].tolist(), flat[784:]],  # one image nested, the other flat
        [[[[*row, 0.0] for row in img[0]]] for img in x.tolist()],  # a row too long
        [[[[[v] for v in row] for row in img[0]]] for img in x.tolist()],  # nested deeper than the shape
    ]
    for data in wrong:
        response = client.post(INFER, json={"inputs": [{**tensor(x), "data": data}]})
        assert response.status_code == 400, response.text
        assert "shape" in response.json()["error"], response.json()


def test_outputs_are_each_asked_once_and_an_empty_list_asks_for_all(client: TestClient, batch: tuple) -> None:
    x = to_model_input(batch[0][:1])
    twice = client.post(INFER, json={"inputs": [tensor(x)], "outputs": [{"name": "label"}, {"name": "label"}]})
    assert twice.status_code == 400 and "more than once" in twice.json()["error"]
    every = client.post(INFER, json={"inputs": [tensor(x)]}).json()
    empty = client.post(INFER, json={"inputs": [tensor(x)], "outputs": []}).json()
    assert [o["name"] for o in empty["outputs"]] == [o["name"] for o in every["outputs"]] and len(every["outputs"]) > 5


def test_errors_take_the_protocols_shape_on_its_routes(client: TestClient) -> None:
    """The protocol's error is a string ({"error": "..."}): Triton's client fails to even print an object there.
    The code and the image index sit beside it; /classify keeps its own shape."""
    refused = client.post(INFER, json={"inputs": []})
    assert refused.status_code == 400
    assert refused.json() == {"error": refused.json()["error"], "code": "bad_request", "file_index": None}
    assert isinstance(refused.json()["error"], str) and "exactly one input" in refused.json()["error"]
    unknown = client.get("/v2/models/other/ready")
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_model"
    assert isinstance(client.get("/v2/nowhere").json()["error"], str)  # the 404 of no route, too
    assert client.post("/classify", content=b"x", headers={"content-type": "text/plain"}).json()["error"]["code"] == (
        "unsupported_media_type"
    )


def test_the_models_one_version_is_served_at_the_versioned_routes(client: TestClient, batch: tuple) -> None:
    x = to_model_input(batch[0][:2])
    meta = client.get(f"/v2/models/{NAME}").json()
    assert meta["versions"] == ["1"]
    assert client.get(f"/v2/models/{NAME}/versions/1").json() == meta
    assert client.get(f"/v2/models/{NAME}/versions/1/ready").json() == {"name": NAME, "ready": True}
    plain = client.post(INFER, json={"inputs": [tensor(x)]}).json()
    versioned = client.post(f"/v2/models/{NAME}/versions/1/infer", json={"inputs": [tensor(x)]}).json()
    assert versioned == plain
    for path in (f"/v2/models/{NAME}/versions/2", f"/v2/models/{NAME}/versions/2/ready"):
        response = client.get(path)
        assert response.status_code == 404 and "no version '2'" in response.json()["error"], response.text
    response = client.post(f"/v2/models/{NAME}/versions/2/infer", json={"inputs": [tensor(x)]})
    assert response.status_code == 404 and response.json()["code"] == "unknown_model"


def test_nan_binary_tensors_and_sizes_that_do_not_add_up_are_refused(client: TestClient) -> None:
    x = np.zeros((2, 1, 28, 28), np.float32)
    x[1, 0, 3, 3] = np.nan
    head = json.dumps({"inputs": [{"name": "images", "shape": [2, 1, 28, 28], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()  # fmt: skip
    headers = {"Inference-Header-Content-Length": str(len(head))}
    response = client.post(INFER, content=head + x.tobytes(), headers=headers)
    assert response.status_code == 400 and response.json()["file_index"] == 1
    response = client.post(INFER, content=head + x.tobytes()[:-4], headers=headers)
    assert response.status_code == 400 and "binary_data_size" in response.json()["error"]
    response = client.post(INFER, content=head, headers={"Inference-Header-Content-Length": "99999"})
    assert response.status_code == 400


def test_the_model_name_readiness_and_key_are_those_of_classify(batch: tuple) -> None:
    body = {"inputs": [tensor(to_model_input(batch[0][:1]))]}
    with TestClient(create_app(Settings(models_dir=MODELS, api_key="k"))) as c:
        wait_ready(c)
        assert c.post(INFER, json=body).status_code == 401
        assert c.post(INFER, json=body, headers={"X-API-Key": "k"}).status_code == 200
        assert c.post("/v2/models/other/infer", json=body, headers={"X-API-Key": "k"}).status_code == 404
        assert c.get(f"/v2/models/{NAME}/ready").json() == {"name": NAME, "ready": True}
        assert c.get("/v2/models/other/ready").status_code == 404
        metrics = c.get("/metrics").text
    assert 'route="/v2/models/{name}/infer",status="200"' in metrics


def test_the_guard_off_answers_only_the_models_label(batch: tuple) -> None:
    x = to_model_input(batch[0][:2])
    with TestClient(create_app(Settings(models_dir=MODELS, signals="none"))) as c:
        wait_ready(c)
        body = c.post(INFER, json={"inputs": [tensor(x)]}).json()
        assert set(outputs(body)) == {"label", "confidence", "original_label"}
        refused = c.post(INFER, json={"inputs": [tensor(x)], "outputs": [{"name": "backdoor"}]})
    assert refused.status_code == 400  # no verdict rather than a false one


def test_model_metadata_describes_the_infer_tensors(client: TestClient, batch: tuple) -> None:
    meta = client.get(f"/v2/models/{NAME}").json()
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28], "dtype": "float32"}]
    body = client.post(INFER, json={"inputs": [tensor(to_model_input(batch[0][:2]))]}).json()
    answered = [(o["name"], o["datatype"]) for o in body["outputs"]]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == answered  # the same tensors, in the same order
    assert [o["name"] for o in meta["classifier_outputs"]] == ["logits", "features"]


def test_kserves_rest_client_gets_the_same_answers(live: LiveService, client: TestClient, batch: tuple) -> None:
    import asyncio

    from kserve import InferenceRESTClient, InferInput, InferRequest
    from kserve.inference_client import RESTConfig

    pixels, _ = batch
    answers = client.post("/classify", files=files(*(png(p) for p in pixels))).json()["results"]
    x = to_model_input(pixels)

    async def ask() -> object:
        kserve_client = InferenceRESTClient(RESTConfig(protocol="v2", retries=1))
        try:
            request = InferRequest(NAME, [InferInput("images", list(x.shape), "FP32", data=x)])
            return await kserve_client.infer(live.url, request, model_name=NAME)
        finally:
            await kserve_client.close()

    response = asyncio.run(ask())
    label = response.get_output_by_name("label").as_numpy()  # type: ignore[attr-defined]
    backdoor = response.get_output_by_name("backdoor").as_numpy()  # type: ignore[attr-defined]
    assert label.tolist() == [r["label"] for r in answers]
    assert backdoor.tolist() == [r["backdoor"] for r in answers]


def test_a_bundle_holding_the_repaired_model_without_its_signal_answers_without_repaired_label(
    batch: tuple, tmp_path: Path
) -> None:
    """The repaired model runs for the repaired signal, not because its file is in the bundle: a bundle that lists
    the file and runs a subset of signals without it must not advertise an output it cannot give (it was a 500)."""
    copy = tmp_path / "models"
    shutil.copytree(MODELS, copy, ignore=shutil.ignore_patterns("checkpoints"))
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["signals"]["repaired"]
    fused = manifest["thresholds"]["fused"]
    for table in ("quantiles", "tail_scale"):
        del fused[table]["repaired"]
    manifest["thresholds"]["label_source"]["source"] = "restored"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    x = to_model_input(batch[0][:2])
    with TestClient(create_app(Settings(models_dir=copy))) as c:
        wait_ready(c)
        answered = c.post(INFER, json={"inputs": [tensor(x)]})
        listed = {o["name"] for o in c.get(f"/v2/models/{NAME}").json()["outputs"]}
    assert answered.status_code == 200, answered.text
    assert "repaired_label" not in outputs(answered.json()) and "repaired_label" not in listed
    assert "repaired_score" not in listed and "label" in listed


def test_inference_bodies_count_against_the_upload_budget(client: TestClient, batch: tuple) -> None:
    """Many slow /infer requests at once are bounded as /classify's uploads are (GUARD_BODY_BUDGET_BYTES): with the
    budget all but held by others, a request is refused as its body arrives, the connection closed; the bytes go
    back when a request ends, so the next one is served."""
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    budget = runtime.body_budget
    body = {"inputs": [tensor(to_model_input(batch[0][:1]))]}
    before = budget.used
    budget.used = budget.capacity - 100  # what stalled uploads would hold
    try:
        refused = client.post(INFER, json=body)
        assert refused.status_code == 503 and refused.json()["code"] == "overloaded", refused.text
        assert refused.headers["connection"] == "close"
    finally:
        budget.used = before
    assert client.post(INFER, json=body).status_code == 200 and budget.used == before
