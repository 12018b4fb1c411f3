"""The real service scraped by the real Prometheus, with the demo's own configuration and rules.

Every PromQL expression of the Grafana dashboard and of the rules must return a result: no panel or alert
may refer to a metric the guard does not export. The demo client provides the traffic, as in compose.
"""

import argparse
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from service.demo_client import run
from tests.browser import screenshot_dir
from tests.docker.dashboard_preview import render
from tests.docker.prometheus_live import (
    PROMETHEUS_DIR,
    Prometheus,
    as_bool_comparisons,
    dashboard_queries,
    finite,
    prometheus,
)
from tests.live import live_service

pytestmark = pytest.mark.slow
# How long the demo traffic runs: long enough for four scrapes here; `make screenshots` asks for minutes.
DEMO_SECONDS = float(os.environ.get("GUARD_DEMO_SECONDS", "30"))
RULES = [r for f in sorted((PROMETHEUS_DIR / "rules").glob("*.yml")) for g in yaml.safe_load(f.read_text())["groups"]
         for r in g["rules"]]  # fmt: skip


class Scraped:
    def __init__(self, prom: Prometheus, start: float, waves: bool) -> None:
        self.prom, self.start, self.waves = prom, start, waves


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    """A guard under demo traffic, and a Prometheus that has scraped it at least four times."""
    workdir: Path = tmp_path_factory.mktemp("prometheus")
    with live_service() as guard, prometheus(guard.url.removeprefix("http://"), workdir) as prom:
        rate = 8.0
        waves = DEMO_SECONDS >= 120  # the long run for the README shows an attack wave
        args = argparse.Namespace(
            url=guard.url, rate=rate, max_images=4, triggered_share=0.05 if waves else 0.3,
            wave_every=DEMO_SECONDS / 2 if waves else 0, wave_seconds=60, wave_share=0.8,
            requests=int(rate * DEMO_SECONDS), api_key=None, seed=0,
        )  # fmt: skip
        client = threading.Thread(target=run, args=(args,), daemon=True)
        start = time.time()
        client.start()
        deadline = time.monotonic() + DEMO_SECONDS + 60
        while True:  # four scrapes of the traffic (5 s apart) and the rules evaluated on them
            up = prom.query('count_over_time(up{job="backdoor-guard"}[1m])')
            if up and float(up[0]["value"][1]) >= 4 and prom.query("guard:images:rate1m"):
                break
            assert time.monotonic() < deadline, "prometheus did not scrape the guard"
            time.sleep(1)
        if waves:
            client.join()
        yield Scraped(prom, start, waves)
        client.join()


def test_the_guard_is_scraped(scraped: Scraped) -> None:
    (up,) = scraped.prom.query('up{job="backdoor-guard"}')
    assert up["value"][1] == "1"
    assert scraped.prom.query("guard_ready")[0]["value"][1] == "1"
    names = set(scraped.prom.api("label/__name__/values"))
    assert {"guard_images_total", "guard_fused_surprise_bucket", "guard_strip_entropy_bucket",
            "guard_queue_limit_images"} <= names  # fmt: skip


@pytest.mark.parametrize(("title", "expr"), dashboard_queries(), ids=[f"{t}: {e[:40]}" for t, e in dashboard_queries()])
def test_every_dashboard_query_returns_a_value(scraped: Scraped, title: str, expr: str) -> None:
    result = scraped.prom.query(expr)
    assert result, f"panel {title!r}: {expr} returned nothing"
    assert finite(result), f"panel {title!r}: {expr} returned only NaN: {result}"
    names = set(scraped.prom.api("label/__name__/values"))
    for metric in re.findall(r"\bguard_\w+", expr):
        assert metric in names, f"panel {title!r} uses {metric}, which the guard does not export"


@pytest.mark.parametrize("rule", RULES, ids=[r.get("record") or r["alert"] for r in RULES])
def test_every_rule_evaluates_on_real_series(scraped: Scraped, rule: dict) -> None:
    """Recording rules return a series; alert conditions, compared with `bool`, return one too."""
    expr = rule["expr"] if "record" in rule else as_bool_comparisons(rule["expr"])
    result = scraped.prom.query(expr)
    assert result, f"{rule.get('record') or rule['alert']}: {expr} returned nothing"
    assert finite(result), f"{rule.get('record') or rule['alert']}: {expr} returned only NaN: {result}"
    groups = scraped.prom.api("rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    name = rule.get("record") or rule["alert"]
    assert loaded[name]["health"] == "ok", loaded[name]
    if "alert" in rule and rule["alert"] != "BackdoorVerdictSpike":
        assert loaded[name]["state"] == "inactive", f"{name} fires on a healthy guard"
    if rule.get("alert") == "BackdoorVerdictSpike" and scraped.waves:  # the run ends in an attack wave
        assert loaded[name]["state"] == "firing", loaded[name]


def test_the_demo_traffic_was_judged_as_expected(scraped: Scraped) -> None:
    """What the dashboard shows matches what was sent: triggered images flagged, clean ones not."""
    prom = scraped.prom
    backdoor = float(prom.query('sum(guard_images_total{verdict="backdoor"})')[0]["value"][1])
    total = float(prom.query("sum(guard_images_total)")[0]["value"][1])
    assert total > 0 and 0 < backdoor < total
    triggers = {r["metric"]["signal"]: float(r["value"][1]) for r in prom.query("guard_signal_triggers_total")}
    assert set(triggers) == {"detrigger", "activation", "repaired", "expert", "mahalanobis"}
    assert triggers["detrigger"] > 0


def test_a_picture_of_the_dashboard(scraped: Scraped) -> None:
    out = screenshot_dir() / "dashboard.png"
    render(scraped.prom, scraped.start, time.time(), out)
    assert out.stat().st_size > 20_000
