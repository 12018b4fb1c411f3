"""The service as operators run it: metrics under promtool, batching under concurrency, the real process."""

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.bundle import Bundle, build_pipeline
from service.preprocess import to_model_input
from service.settings import Settings
from tests.conftest import MODELS
from tests.live import free_port, live_service, run_service
from tests.service.conftest import files, png, wait_ready

pytestmark = pytest.mark.data


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool: apt-get install prometheus")
def test_metrics_pass_promtool(client: TestClient, samples: dict) -> None:
    client.post("/classify", files=files(png(samples["clean"][0]), png(samples["triggered"][0])))
    client.post("/classify", json={})
    text = client.get("/metrics").text
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in (
        "guard_requests_total", "guard_request_duration_seconds_bucket", "guard_queue_wait_seconds_bucket",
        "guard_batch_compute_seconds_bucket", "guard_batch_size_images_bucket", "guard_images_total",
        "guard_signal_triggers_total", "guard_strip_entropy_bucket", "guard_fused_surprise_bucket",
        "guard_model_info", "guard_ready",
    ):  # fmt: skip
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    assert 'guard_images_total{verdict="backdoor"}' in text
    assert re.search(r'guard_requests_total\{route="/classify",status="415"\} [1-9]', text)


def test_single_images_run_on_the_small_twin_and_larger_batches_do_not(samples: dict) -> None:
    """The service's pipeline hands batches of at most SIDE_MAX_IMAGES images to its twin (the second opinions on
    the side thread: a `side_wait` stage), larger ones to its own models; both answer as the bundle's guard does."""
    from service.guard import SIDE_MAX_IMAGES

    def side_waits(c: TestClient) -> float:
        m = re.search(r'^guard_stage_seconds_total\{stage="side_wait"\} (\S+)$', c.get("/metrics").text, re.M)
        return float(m.group(1)) if m else 0.0

    images = np.concatenate([samples["clean"][:6], samples["triggered"][:6]])
    expected = build_pipeline(Bundle.load(MODELS), small=False).run(to_model_input(images))
    settings = Settings(models_dir=MODELS, ort_threads=2)  # a twin of one thread each, on any machine
    assert settings.warm_up_batch > SIDE_MAX_IMAGES
    with TestClient(create_app(settings)) as c:
        wait_ready(c)  # the warm-up batch is too large for the twin: a single image of the warm-up warmed it
        warmed = side_waits(c)
        assert warmed > 0.0
        big = c.post("/classify", files=files(*[png(i) for i in images])).json()["results"]
        assert side_waits(c) == warmed
        one = [c.post("/classify", files=files(png(i))).json()["results"][0] for i in images[[0, 6]]]
        assert side_waits(c) > warmed
    assert [r["backdoor"] for r in big] == expected.backdoor.tolist()
    assert [r["label"] for r in big] == expected.labels.tolist()
    assert [r["backdoor"] for r in one] == expected.backdoor[[0, 6]].tolist() == [False, True]
    assert [r["label"] for r in one] == expected.labels[[0, 6]].tolist()


def test_metrics_is_an_explicit_route(client: TestClient) -> None:
    response = client.get("/metrics", follow_redirects=False)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")


def test_concurrent_requests_are_batched_and_answered_in_order(samples: dict) -> None:
    """24 clients at once, one image each: fewer batches than requests, and each gets its own image's answer."""
    settings = Settings(models_dir=MODELS, max_delay_ms=50, max_batch=32)
    images = np.concatenate([samples["clean"][:12], samples["triggered"][:12]])
    expected = build_pipeline(Bundle.load(MODELS)).run(to_model_input(images))
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        runtime = c.app.state.runtime  # type: ignore[attr-defined]
        before = runtime.metrics.batch_size.collect()[0].samples

        def post(i: int) -> dict:
            return c.post("/classify", files=files(png(images[i]), name=f"client{i}-")).json()["results"][0]

        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(post, range(24)))
        after = runtime.metrics.batch_size.collect()[0].samples
    count = {s.name: s.value for s in after}["guard_batch_size_images_count"] - {s.name: s.value for s in before}[
        "guard_batch_size_images_count"
    ]
    assert count < 24, "no two requests shared a batch"
    for i, r in enumerate(results):
        assert r["filename"] == f"client{i}-0.png"
        assert r["label"] == expected.labels[i] and r["backdoor"] == expected.backdoor[i]
        assert r["score"] == pytest.approx(expected.score[i], abs=1e-6)


@pytest.mark.slow
def test_the_real_process_serves_and_stops(samples: dict) -> None:
    with live_service() as live:
        response = httpx.post(f"{live.url}/classify", files=files(png(samples["triggered"][0])))
        assert response.status_code == 200 and response.json()["results"][0]["backdoor"] is True
    assert live.proc.returncode == 0, live.output


@pytest.mark.slow
def test_the_process_refuses_a_tampered_bundle(tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(MODELS, copy)
    (copy / "strip_bank.npy").write_bytes(b"\x93NUMPY tampered")
    proc = run_service({"GUARD_MODELS_DIR": str(copy), "GUARD_PORT": str(free_port())})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "strip_bank" in out and "SHA-256" in out


def test_a_strip_n_for_a_bundle_without_strip_stops_the_start_with_one_line() -> None:
    proc = run_service({"GUARD_STRIP_N": "8", "GUARD_PORT": str(free_port())})
    out, _ = proc.communicate(timeout=60)
    last = out.strip().splitlines()[-1]  # after the bundle's own "verified" log line, one line and no traceback
    assert proc.returncode == 1 and "Traceback" not in out, out
    assert last.startswith("backdoor-guard: refusing to start") and "GUARD_STRIP_N is set but" in last, out


def test_invalid_settings_stop_the_start_with_a_clear_message() -> None:
    for env, words in (
        ({"GUARD_PORT": "eighty"}, "GUARD_PORT"),
        ({"GUARD_MAX_BATCH": "0"}, "GUARD_MAX_BATCH"),
        ({"GUARD_MODELS_DIR": "/nonexistent"}, "manifest.json"),
        ({"GUARD_MAX_QUEUE": "4"}, "GUARD_MAX_FILES"),
        ({"GUARD_MAX_QUEUE": "4", "GUARD_MAX_FILES": "2"}, "never become ready"),
    ):
        proc = run_service(env)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 2 and words in out, out


def test_the_fused_surprise_histogram_holds_each_judged_image(settings: Settings, samples: dict) -> None:
    """guard_fused_surprise observes -ln(1 - score) of every judged image (capped where the score rounds to 1),
    whatever the bundle's signals, and its threshold on that scale is served beside the fused one."""
    from service.metrics import FUSED_CAP

    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        blobs = [png(p) for p in (*samples["clean"][:6], *samples["triggered"][:2])]
        results = c.post("/classify", files=files(*blobs)).json()["results"]
        surprise = c.get("/v2/models/fashion-mnist-kwon").json()["thresholds"]["fused"]["surprise"]
        text = c.get("/metrics").text
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    assert value("guard_fused_surprise_count") == len(results) == 8
    expected = [min(-np.log1p(-min(r["score"], 1.0)) if r["score"] < 1 else FUSED_CAP, FUSED_CAP) for r in results]
    assert value("guard_fused_surprise_sum") == pytest.approx(sum(expected), rel=1e-6)
    below = value('guard_fused_surprise_bucket{le="12.0"}')  # the bucket just above the threshold (11.7)
    assert 11 < surprise < 12 and below == sum(not r["backdoor"] for r in results)
    assert sum(r["backdoor"] for r in results) >= 2  # the triggered ones, past the threshold
