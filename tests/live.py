"""Real processes for tests: the service as `python -m service` runs it, on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_service(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service", *args], env={**os.environ, **env}, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_until_ok(proc: subprocess.Popen, url: str, timeout: float, output: Callable[[], str]) -> None:
    """Poll url until it answers 200; fail with the process's output if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited: {output()}")
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered 200"
        time.sleep(0.1)


@dataclass
class LiveService:
    proc: subprocess.Popen
    url: str
    output: str = ""  # what the process printed, once it has stopped


@contextmanager
def live_service(env: dict[str, str] | None = None, timeout: float = 60.0) -> Iterator[LiveService]:
    """Start the service, wait until /v2/health/ready says ready, stop it with SIGINT (as Ctrl-C would)."""
    port = free_port()
    proc = run_service({"GUARD_HOST": "127.0.0.1", "GUARD_PORT": str(port), **(env or {})})
    live = LiveService(proc, f"http://127.0.0.1:{port}")
    try:
        wait_until_ok(proc, f"{live.url}/v2/health/ready", timeout, lambda: proc.stdout.read() if proc.stdout else "")
        yield live
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            live.output, _ = proc.communicate(timeout=30)  # also closes the pipe
        except subprocess.TimeoutExpired:
            proc.kill()
            live.output, _ = proc.communicate()
