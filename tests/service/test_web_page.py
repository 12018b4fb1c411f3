"""The demo page at GET /, driven in headless Chromium against the real service process."""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.routes.ui import STATIC_DIR
from tests.browser import chromium, screenshot_dir
from tests.live import LiveService, live_service

pytestmark = pytest.mark.slow
SAMPLES = json.loads((STATIC_DIR / "samples" / "index.json").read_text())


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    with live_service() as service:
        yield service


@pytest.fixture(scope="module")
def browser(live: LiveService, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with chromium(tmp_path_factory.mktemp("chromium-profile"), height=1000) as driver:
        driver.get(live.url + "/")
        wait(driver).until(lambda d: d.find_element("id", "status").get_attribute("data-state") == "ready")
        yield driver


def wait(driver, seconds: float = 20):  # type: ignore[no-untyped-def]
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds)


def result_of(driver) -> dict:  # type: ignore[no-untyped-def]
    """What the page shows once a result is on it."""
    wait(driver).until(lambda d: d.find_element("id", "result").is_displayed())
    restored = driver.find_element("id", "restored-image")
    wait(driver).until(lambda d: d.execute_script("return arguments[0].naturalWidth", restored) > 0)
    rows = driver.find_elements("css selector", "#signals tr")
    return {
        "backdoor": driver.find_element("id", "verdict").get_attribute("data-backdoor"),
        "verdict": driver.find_element("id", "verdict").text,
        "label": driver.find_element("id", "label").text,
        "restored_width": driver.execute_script("return arguments[0].naturalWidth", restored),
        "signals": {r.get_attribute("data-signal"): r.find_elements("css selector", "td")[1].text for r in rows},
    }


def test_the_page_and_its_files_are_served(live: LiveService) -> None:
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path in ("/static/app.js", "/static/style.css", "/static/samples/index.json"):
        assert httpx.get(live.url + path).status_code == 200, path
    for sample in SAMPLES:
        response = httpx.get(f"{live.url}/static/samples/{sample['file']}")
        assert response.status_code == 200 and response.content[:4] == b"\x89PNG"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(live.url + "/static/../models/manifest.json").status_code == 404
    assert "/" not in httpx.get(live.url + "/openapi.json").json()["paths"], "the page is not part of the API"


def test_uploading_a_triggered_sample_shows_the_verdict_and_the_restored_image(browser) -> None:  # type: ignore[no-untyped-def]
    sample = next(s for s in SAMPLES if s["kind"] == "triggered" and s["class_name"] == "Sneaker")
    browser.find_element("id", "file").send_keys(str(STATIC_DIR / "samples" / sample["file"]))
    shown = result_of(browser)
    assert shown["backdoor"] == "true" and "Backdoor trigger detected" in shown["verdict"]
    assert shown["label"] == "Sneaker", "the label to trust is the restored one, the true class"
    assert shown["restored_width"] == 28
    assert set(shown["signals"]) == {"detrigger", "activation", "repaired", "expert", "mahalanobis"}
    assert shown["signals"]["detrigger"] == "triggered"
    assert browser.find_element("id", "original-label").text.startswith("T-shirt/top"), "the attacker's label"
    # the fused score and its threshold both sit next to 1: shown apart (they both read "1.00" before)
    assert re.search(r"threshold 1 − \d\.\de-\d+", shown["verdict"]), shown["verdict"]
    browser.save_screenshot(str(screenshot_dir() / "web-page.png"))


def test_clicking_a_clean_sample_shows_no_trigger(browser) -> None:  # type: ignore[no-untyped-def]
    thumbs = browser.find_elements("css selector", "#samples-clean button")
    assert len(thumbs) == sum(s["kind"] == "clean" for s in SAMPLES)
    assert len(browser.find_elements("css selector", "#samples-triggered button")) == sum(
        s["kind"] == "triggered" for s in SAMPLES
    )
    bag = next(t for t in thumbs if t.get_attribute("data-file").endswith("-bag.png"))
    bag.click()
    wait(browser).until(lambda d: d.find_element("id", "label").text == "Bag")
    shown = result_of(browser)
    assert shown["backdoor"] == "false" and "No backdoor trigger found" in shown["verdict"]


def test_dropping_an_image_on_the_page_classifies_it(browser) -> None:  # type: ignore[no-untyped-def]
    """A drop event carrying a file, as a browser fires it when one is dragged from the desktop."""
    sample = next(s for s in SAMPLES if s["kind"] == "triggered" and s["class_name"] == "Coat")
    browser.execute_script(
        """const [url, name] = arguments;
        fetch(url).then((r) => r.blob()).then((blob) => {
          const data = new DataTransfer();
          data.items.add(new File([blob], name, {type: "image/png"}));
          const drop = document.getElementById("drop");
          drop.dispatchEvent(new DragEvent("dragover", {dataTransfer: data, bubbles: true, cancelable: true}));
          drop.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
        });""",
        f"/static/samples/{sample['file']}", "dropped-coat.png",
    )  # fmt: skip
    wait(browser).until(lambda d: d.find_element("id", "label").text == "Coat")
    assert result_of(browser)["backdoor"] == "true"
    assert '"filename": "dropped-coat.png"' in browser.find_element("id", "raw").get_attribute("textContent")
    assert "over" not in browser.find_element("id", "drop").get_attribute("class")


def test_a_file_that_is_not_an_image_shows_the_services_error(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    browser.find_element("id", "file").send_keys(str(text))
    wait(browser).until(lambda d: d.find_element("id", "error").is_displayed())
    message = browser.find_element("id", "error").text
    assert "400 bad_image" in message and "notes.png" in message
    assert not browser.find_element("id", "result").is_displayed()


def test_the_page_logs_no_script_errors(browser) -> None:  # type: ignore[no-untyped-def]
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "/classify" not in e["message"]]
    assert errors == [], errors  # the 400 above is logged by the browser as a failed request: expected


def test_the_api_docs_render_from_packaged_files(browser, live: LiveService) -> None:  # type: ignore[no-untyped-def]
    """/docs (linked from the page) must work on a closed network: Swagger UI from the package, not a CDN."""
    html = httpx.get(live.url + "/docs").text
    assert "cdn." not in html and "/static-offline-docs/swagger-ui-bundle.js" in html
    browser.get(live.url + "/docs")
    wait(browser).until(
        lambda d: "/classify" in [e.text for e in d.find_elements("css selector", ".opblock-summary-path")]
    )
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors  # a CDN request would fail here (no network) and be logged
    assert httpx.get(live.url + "/redoc").status_code == 200


def test_a_guard_with_an_api_key_asks_for_it_once(tmp_path: Path) -> None:
    with live_service({"GUARD_API_KEY": "s3cret"}) as guarded, chromium(tmp_path / "profile") as driver:
        driver.get(guarded.url + "/")
        wait(driver).until(lambda d: d.find_elements("css selector", "#samples-clean button"))
        driver.find_elements("css selector", "#samples-triggered button")[0].click()
        wait(driver).until(lambda d: d.find_element("id", "key-form").is_displayed())
        assert "401 unauthorized" in driver.find_element("id", "error").text
        driver.find_element("id", "api-key").send_keys("s3cret")
        driver.find_element("css selector", "#key-form button").click()
        assert result_of(driver)["backdoor"] == "true"
        assert not driver.find_element("id", "key-form").is_displayed()
        driver.find_elements("css selector", "#samples-clean button")[0].click()  # the key is remembered
        wait(driver).until(lambda d: d.find_element("id", "label").text == "T-shirt/top")
        assert not driver.find_element("id", "error").is_displayed()


def test_with_the_guard_off_the_page_says_no_verdict_never_clean(tmp_path_factory: pytest.TempPathFactory) -> None:
    sample = next(s for s in SAMPLES if s["kind"] == "triggered")
    with live_service({"GUARD_SIGNALS": "none"}) as plain, chromium(tmp_path_factory.mktemp("off")) as driver:
        driver.get(plain.url + "/")
        wait(driver).until(lambda d: d.find_element("id", "status").get_attribute("data-state") == "ready")
        driver.find_element("id", "file").send_keys(str(STATIC_DIR / "samples" / sample["file"]))
        wait(driver).until(lambda d: d.find_element("id", "result").is_displayed())
        verdict = driver.find_element("id", "verdict")
        assert verdict.get_attribute("data-backdoor") == "null"
        assert "Guard off: no verdict" in verdict.text and "No backdoor" not in verdict.text
        assert driver.find_element("id", "restored-label").text == "not computed (guard off)"
        assert driver.find_element("id", "label").text == "T-shirt/top", "the model's own (the attacker's) label"
        assert driver.find_elements("css selector", "#signals tr") == []
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
