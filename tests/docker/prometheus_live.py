"""Debian's prometheus binary, run with the compose demo's own configuration pointed at a local guard."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT
from tests.live import free_port, wait_until_ok

PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "backdoor-guard.json"
# Grafana's variables, as Grafana would set them with a 5 s scrape interval over a short time range.
GRAFANA_VARIABLES = {"$__rate_interval": "20s", "$__interval": "5s", "$__range": "5m"}


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: Any) -> Any:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 5) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]


def scrape_config(target: str, out: Path) -> Path:
    """docker/prometheus/prometheus.yml with only the target (and the rule path) changed."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["rule_files"] = [str(PROMETHEUS_DIR / rule) for rule in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"][0]["targets"] = [target]
    out.write_text(yaml.safe_dump(config))
    return out


@contextmanager
def prometheus(target: str, workdir: Path, timeout: float = 30.0) -> Iterator[Prometheus]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is missing: `make test` installs Debian's prometheus")
    port = free_port()
    config = scrape_config(target, workdir / "prometheus.yml")
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        wait_until_ok(proc, f"{server.url}/-/ready", timeout, (workdir / "prometheus.log").read_text)
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def grafana_expr(expr: str) -> str:
    """A panel's PromQL with Grafana's variables filled in."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, runnable PromQL) for every target of every panel."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], grafana_expr(t["expr"])) for p in panels for t in p["targets"]]


def as_bool_comparisons(expr: str) -> str:
    """`a > 0.1 and b > 0.05` -> `a > bool 0.1 and b > bool 0.05`: a result whenever the operands exist."""
    return re.sub(r"(==|!=|>=|<=|>|<)\s*(?=[0-9.])", r"\1 bool ", expr)


def finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)
