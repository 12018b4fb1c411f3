"""backdoor-guard verify | healthcheck | demo, as the Docker image and the compose demo run them."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.demo_client import add_arguments, load_samples, multipart, run
from tests.conftest import MODELS, ROOT
from tests.live import free_port, live_service

pytestmark = pytest.mark.slow


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", *args], env={**os.environ, **(env or {})}, cwd=ROOT,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_verify_passes_on_the_shipped_bundle() -> None:
    result = cli("verify")
    assert result.returncode == 0, result.stderr
    files = len(json.loads((MODELS / "manifest.json").read_text())["files"])
    # classifier, repaired_classifier, backdoor_expert, two autoencoders, reversed_triggers, bank, feature_gaussian
    assert files == 8
    assert "fashion-mnist-kwon" in result.stdout and f"{files} files verified" in result.stdout


def test_verify_fails_on_a_tampered_bundle_and_names_the_file(tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(MODELS, copy, ignore=shutil.ignore_patterns("checkpoints"))  # as the image holds it
    assert cli("verify", env={"GUARD_MODELS_DIR": str(copy)}).returncode == 0
    onnx = copy / "detrigger_ae.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\x00")
    result = cli("verify", env={"GUARD_MODELS_DIR": str(copy)})
    assert result.returncode == 1 and "detrigger_ae" in result.stderr and "SHA-256" in result.stderr


def test_healthcheck_follows_readiness() -> None:
    with live_service() as live:
        port = live.url.rsplit(":", 1)[1]
        assert cli("healthcheck", env={"GUARD_PORT": port, "GUARD_HOST": "0.0.0.0"}).returncode == 0
    result = cli("healthcheck", env={"GUARD_PORT": str(free_port())})
    assert result.returncode == 1 and "/v2/health/ready" in result.stderr


def test_multipart_bodies_are_what_the_service_parses() -> None:
    samples = load_samples()[:2]
    body, content_type = multipart(samples)
    boundary = content_type.split("boundary=")[1]
    assert body.count(f"--{boundary}\r\n".encode()) == 2 and body.endswith(f"--{boundary}--\r\n".encode())
    assert all(s.png in body for s in samples)


def test_the_demo_client_sends_both_kinds_and_the_guard_tells_them_apart() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with live_service() as live:
        args = parser.parse_args(
            ["--url", live.url, "--requests", "30", "--rate", "50", "--triggered-share", "0.5", "--wave-every", "0"]
        )
        tally = run(args)
    assert tally.errors == 0
    triggered = tally.counts.get(("triggered", True), 0) + tally.counts.get(("triggered", False), 0)
    clean = tally.counts.get(("clean", True), 0) + tally.counts.get(("clean", False), 0)
    assert triggered > 5 and clean > 5
    assert tally.counts.get(("triggered", False), 0) == 0, "a shipped triggered sample went unflagged"
    assert tally.counts.get(("clean", True), 0) == 0, "a shipped clean sample was flagged"
