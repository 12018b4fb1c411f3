"""backdoor-guard demo: keep a running guard busy with clean and triggered samples, so dashboards show life.

Standard library only (it runs in the service image next to the guard). Traffic is a steady mix with a
small share of triggered images, and every `--wave-every` seconds an attack wave in which most images carry
the trigger: the backdoor-verdict panels move and the BackdoorVerdictSpike alert fires, as it would when
someone starts probing a real deployment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("demo")
SAMPLES_DIR = Path(__file__).resolve().parent / "static" / "samples"


@dataclass(frozen=True)
class Sample:
    file: str
    kind: str  # clean | triggered
    png: bytes


@dataclass
class Tally:
    """How the guard judged what we sent: by what we sent (kind) and what it said (backdoor or not)."""

    counts: dict[tuple[str, bool], int] = field(default_factory=dict)
    errors: int = 0

    def add(self, kind: str, backdoor: bool) -> None:
        self.counts[kind, backdoor] = self.counts.get((kind, backdoor), 0) + 1

    def line(self) -> str:
        def share(kind: str) -> str:
            flagged, total = self.counts.get((kind, True), 0), sum(v for (k, _), v in self.counts.items() if k == kind)
            return f"{kind} flagged {flagged}/{total}"

        return f"{share('triggered')}, {share('clean')}, errors {self.errors}"


def load_samples(folder: Path = SAMPLES_DIR) -> list[Sample]:
    index = json.loads((folder / "index.json").read_text())
    return [Sample(e["file"], e["kind"], (folder / e["file"]).read_bytes()) for e in index]


def multipart(files: list[Sample]) -> tuple[bytes, str]:
    """The body and content type of a multipart/form-data upload with one `files` part per sample."""
    return encode_files([(f.file, f.png) for f in files], "image/png")


def encode_files(files: list[tuple[str, bytes]], content_type: str = "application/octet-stream") -> tuple[bytes, str]:
    """(filename, bytes) pairs -> the body and content type of a /classify upload, one `files` part each."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        safe = name.replace("\\", "/").replace('"', "%22").replace("\r", "").replace("\n", "")
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{safe}"\r\n'
        parts.append(head.encode() + f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _in_range(kind: type[int] | type[float], low: float, high: float = float("inf")) -> Callable[[str], float]:
    """An argparse type: a number of `kind` in [low, high]."""

    def parse(text: str) -> float:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error: "invalid int value"
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("GUARD_URL", "http://127.0.0.1:8000"), help="the guard's base URL")
    share, seconds = _in_range(float, 0.0, 1.0), _in_range(float, 0.0)
    p.add_argument("--rate", type=_in_range(float, 0.01), default=8.0, help="requests per second")
    p.add_argument("--max-images", type=_in_range(int, 1, 64), default=4, help="images per request: 1 to this")
    p.add_argument("--triggered-share", type=share, default=0.05, help="share of triggered images between waves")
    p.add_argument("--wave-every", type=seconds, default=180.0, help="seconds between attack waves (0: no waves)")
    p.add_argument("--wave-seconds", type=seconds, default=60.0, help="length of an attack wave, seconds")
    p.add_argument("--wave-share", type=share, default=0.8, help="share of triggered images during a wave")
    p.add_argument("--requests", type=_in_range(int, 0), default=0, help="stop after this many (0: run until stopped)")
    p.add_argument("--api-key", default=None, help="X-API-Key, when the guard wants one; None: $GUARD_API_KEY")
    p.add_argument("--seed", type=int, default=0, help="seed of the traffic mix")


def send(url: str, batch: list[Sample], api_key: str | None, timeout: float = 30.0) -> list[bool]:
    body, content_type = multipart(batch)
    headers = {"Content-Type": content_type, **({"X-API-Key": api_key} if api_key else {})}
    request = urllib.request.Request(f"{url}/classify", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return [bool(r["backdoor"]) for r in json.loads(response.read())["results"]]


def wait_ready(url: str) -> None:
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as err:
            log.info("waiting for %s to be ready (%s)", url, getattr(err, "reason", err))
        time.sleep(2)


def run(args: argparse.Namespace) -> Tally:
    url = args.url.rstrip("/")
    api_key = args.api_key or os.environ.get("GUARD_API_KEY")
    samples = load_samples()
    pools = {k: [s for s in samples if s.kind == k] for k in ("clean", "triggered")}
    rng = random.Random(args.seed)
    tally, sent, start, last_log = Tally(), 0, time.monotonic(), time.monotonic()
    wait_ready(url)
    log.info("sending to %s at %.1f requests/s", url, args.rate)
    while args.requests == 0 or sent < args.requests:
        now = time.monotonic() - start
        in_wave = args.wave_every > 0 and now % args.wave_every >= args.wave_every - args.wave_seconds
        share = args.wave_share if in_wave else args.triggered_share
        batch = [
            rng.choice(pools["triggered" if rng.random() < share else "clean"])
            for _ in range(rng.randint(1, args.max_images))
        ]
        try:
            for sample, backdoor in zip(batch, send(url, batch, api_key), strict=True):
                tally.add(sample.kind, backdoor)
        except urllib.error.HTTPError as err:
            tally.errors += 1
            log.warning("HTTP %s: %s", err.code, err.read()[:200].decode(errors="replace"))
            time.sleep(float(err.headers.get("Retry-After") or 1))
        except (urllib.error.URLError, OSError) as err:
            tally.errors += 1
            log.warning("%s unreachable (%s); retrying", url, err)
            time.sleep(2)
        sent += 1
        if time.monotonic() - last_log >= 30:
            log.info("%s%s", tally.line(), " (attack wave)" if in_wave else "")
            last_log = time.monotonic()
        time.sleep(max(0.0, start + sent / args.rate - time.monotonic()))
    log.info("done: %d requests; %s", sent, tally.line())
    return tally
