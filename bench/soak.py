"""The soak: long mixed traffic against a real service, its memory sampled: writes reports/soak.md and .json.

    python bench/soak.py [--requests 20000] [--concurrency 32] [--scale 1.0] [--out reports]

`hey` drives four phases, in order, while a thread reads the service's RSS every 0.1 s:
1. single: 3,000 single-image requests at concurrency 8; the steady-state RSS is the median of its last half;
2. mixed: --requests requests split evenly over eight concurrent `hey`s, one per body of k = 1..8 images
   (clean and triggered Fashion-MNIST test images), --concurrency split among them;
3. batch64: 300 requests of one 64-image body at concurrency 4: its peak RSS against the steady state;
4. single-again: 2,000 single-image requests: does memory come back?
The bars (the issue's): 20,000 mixed requests with 0 errors (every non-200 and every transport error counts,
and /metrics must show no 5xx); peak RSS with 64-image batches <= 1.5x the single-image steady state.
Exits 1 when a measured bar (errors, 5xx, RSS) is missed; a smaller run says so in the report.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from run import multipart, scrape  # bench/run.py, beside this file

from training.attacks import PRESETS, triggered_pixels
from training.data import DataConfig, load_dataset
from training.http_check import encode_png

ROOT = Path(__file__).resolve().parents[1]

CONTENT_TYPE = multipart(b"")[1]
MIXED_SIZES = tuple(range(1, 9))  # images per request in the mixed phase
BATCH = 64  # images in the large-batch body (the service's default GUARD_MAX_FILES and GUARD_MAX_BATCH)
RSS_BAR = 1.5  # peak RSS with 64-image batches over the single-image steady state
REQUESTS_BAR = 20_000  # mixed requests the bar asks for
SAMPLE_S = 0.1  # RSS sampling period, seconds


@dataclass(frozen=True)
class Load:
    """One `hey` process: `requests` requests of the body with `images` images, `concurrency` at a time."""

    images: int
    requests: int
    concurrency: int


@dataclass(frozen=True)
class HeyResult:
    """What `hey`'s summary says about one run."""

    statuses: dict[int, int]  # HTTP status -> responses
    transport_errors: dict[str, int]  # hey's error message (timeouts, refused connections) -> count
    requests_per_s: float  # hey's Requests/sec
    p50_ms: float | None  # over the responses that came back; None when none did
    p99_ms: float | None

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + sum(self.transport_errors.values())

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def errors(self) -> int:
        return self.requests - self.ok


def section(text: str, heading: str) -> list[str]:
    """The lines under `heading:` in hey's summary, up to the next blank line."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"{heading}:":
            out = []
            for body in lines[i + 1 :]:
                if not body.strip():
                    break
                out.append(body.strip())
            return out
    return []


def parse_hey(text: str) -> HeyResult:
    """hey's default summary -> statuses, transport errors, requests/s and p50 / p99 latency."""
    statuses: dict[int, int] = {}
    for line in section(text, "Status code distribution"):
        m = re.fullmatch(r"\[(\d+)\]\s+(\d+) responses", line)
        if m:
            statuses[int(m.group(1))] = int(m.group(2))
    errors: dict[str, int] = {}
    for line in section(text, "Error distribution"):
        m = re.fullmatch(r"\[(\d+)\]\s+(.*)", line)
        if m:
            errors[m.group(2)] = errors.get(m.group(2), 0) + int(m.group(1))
    latency = {}
    for line in section(text, "Latency distribution"):
        m = re.fullmatch(r"(\d+)%+ in ([\d.]+) secs", line)
        if m:
            latency[int(m.group(1))] = 1000 * float(m.group(2))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    return HeyResult(statuses, errors, float(rps.group(1)) if rps else 0.0, latency.get(50), latency.get(99))


def write_bodies(folder: Path, test_images: np.ndarray) -> dict[int, Path]:
    """Bodies of k = 1..8 and 64 distinct test images; every other image carries a trigger, the attacks in turn."""
    attacks = [PRESETS[name] for name in PRESETS if name != "clean"]
    paths, start = {}, 0
    for k in (*MIXED_SIZES, BATCH):
        pngs = []
        for j, pixels in enumerate(test_images[start : start + k]):
            if j % 2 == 0:  # uint8 (28, 28) -> triggered, as a PNG holds it
                pixels = triggered_pixels(pixels[None], attacks[(start + j) // 2 % len(attacks)])[0]
            pngs.append(encode_png(pixels))
        paths[k] = folder / f"body-{k}.bin"
        paths[k].write_bytes(multipart(*pngs)[0])
        start += k
    return paths


def status_kib(pid: int, key: str) -> int | None:
    """A field of /proc/PID/status in KiB (VmRSS: resident now; VmHWM: peak); None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak(pid: int) -> bool:
    """Reset the kernel's VmHWM for pid (clear_refs 5, Linux >= 4.0), so it catches spikes between samples."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class RssSampler:
    """Reads the service's VmRSS every SAMPLE_S seconds in a thread, tagged with the phase running then."""

    pid: int
    phase: str = "start"  # set by the main thread as phases begin and end
    samples: list[tuple[float, str, float]] = field(default_factory=list)  # (monotonic s, phase, RSS MiB)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            kib = status_kib(self.pid, "VmRSS")
            if kib is None:
                return
            self.samples.append((time.monotonic(), self.phase, kib / 1024))

    def stats(self, phase: str, start: float, end: float) -> dict[str, float | int | None]:
        """Median RSS over the last half of the phase (its steady state), peak over all of it, MiB."""
        rss = [(t, mib) for t, p, mib in self.samples if p == phase]
        late = [mib for t, mib in rss if t >= (start + end) / 2] or [mib for _, mib in rss]  # a short phase: all
        return {
            "rss_median_mib": statistics.median(late) if late else None,
            "rss_peak_mib": max(mib for _, mib in rss) if rss else None,
            "rss_samples": len(rss),
        }


def live_service(timeout: float) -> AbstractContextManager[Any]:
    """The tests' live service (`python -m service` on a free port, ready, stopped with SIGINT): tests/live.py.

    tests/ is neither installed nor type-checked with the library, hence the import from the checkout at run time.
    """
    sys.path.insert(0, str(ROOT))
    return importlib.import_module("tests.live").live_service(timeout=timeout)


def exact(n: int, c: int) -> int:
    """hey gives each of its c workers n // c requests: round n up to a multiple of c so all n are sent."""
    return c * max(1, math.ceil(n / c))


def phases(requests: int, concurrency: int, scale: float) -> list[tuple[str, list[Load]]]:
    """The four phases, each a set of `hey` loads run at once, every request count multiplied by scale."""
    k = len(MIXED_SIZES)
    per_c = [concurrency // k + (i < concurrency % k) for i in range(k)]
    mixed = round(requests * scale)
    per_n = [mixed // k + (i < mixed % k) for i in range(k)]

    def load(images: int, n: float, c: int) -> Load:
        return Load(images, exact(round(n), c), c)

    return [
        ("single", [load(1, 3000 * scale, 8)]),
        ("mixed", [load(size, n, c) for size, n, c in zip(MIXED_SIZES, per_n, per_c, strict=True)]),
        ("batch64", [load(BATCH, 300 * scale, 4)]),
        ("single-again", [load(1, 2000 * scale, 8)]),
    ]


def hey_command(load: Load, body: Path, url: str) -> list[str]:
    n, c = str(load.requests), str(load.concurrency)
    return ["hey", "-n", n, "-c", c, "-m", "POST", "-T", CONTENT_TYPE, "-D", str(body), f"{url}/classify"]


def run_phase(name: str, loads: list[Load], url: str, bodies: dict[int, Path], sampler: RssSampler) -> dict[str, Any]:
    """Run the loads' `hey`s at once; their counts, errors, rates and latencies, and the RSS meanwhile."""
    sampler.phase = name
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            hey_command(ld, bodies[ld.images], url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for ld in loads
    ]
    outputs = [proc.communicate() for proc in procs]
    end = time.monotonic()
    sampler.phase = f"after {name}"
    for proc, (_, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"hey failed ({proc.returncode}): {err.strip()}")
    results = [parse_hey(out) for out, _ in outputs]
    seconds = end - start
    ok_images = sum(r.ok * ld.images for r, ld in zip(results, loads, strict=True))
    single = results[0] if len(results) == 1 else None
    return {
        "name": name,
        "requests": sum(r.requests for r in results),
        "errors": sum(r.errors for r in results),
        "seconds": seconds,
        "requests_per_s": sum(r.ok for r in results) / seconds,
        "images_per_s": ok_images / seconds,
        "p50_ms": single.p50_ms if single else None,  # a mix has no one percentile: see loads
        "p99_ms": single.p99_ms if single else None,
        **sampler.stats(name, start, end),
        "loads": [
            {**asdict(ld), "sent": r.requests, "errors": r.errors, "statuses": r.statuses,
             "transport_errors": r.transport_errors, "requests_per_s": r.requests_per_s,
             "p50_ms": r.p50_ms, "p99_ms": r.p99_ms}
            for ld, r in zip(loads, results, strict=True)
        ],
    }  # fmt: skip


def requests_by_status(metrics: dict[str, float]) -> dict[str, dict[str, int]]:
    """guard_requests_total -> {route: {status: requests}}."""
    out: dict[str, dict[str, int]] = {}
    for key, value in metrics.items():
        m = re.fullmatch(r"guard_requests_total\{(.*)\}", key)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) if m else {}
        if "route" in labels and "status" in labels:
            out.setdefault(labels["route"], {})[labels["status"]] = int(value)
    return {route: dict(sorted(by.items())) for route, by in sorted(out.items())}


def server_errors(by_route: dict[str, dict[str, int]]) -> int:
    """5xx answers to /classify (the readiness probe's 503s before the service was ready are not errors)."""
    return sum(n for status, n in by_route.get("/classify", {}).items() if status.startswith("5"))


def drain(stream: Any) -> deque[str]:
    """Keep reading the service's output so a full pipe never blocks it; the last lines stay for diagnosis."""
    tail: deque[str] = deque(maxlen=50)

    def read() -> None:
        try:
            for line in stream:
                tail.append(line)
        except ValueError:  # closed by live_service's communicate() at shutdown
            pass

    threading.Thread(target=read, daemon=True).start()
    return tail


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def soak(args: argparse.Namespace, command: str) -> dict[str, Any]:
    plan = phases(args.requests, args.concurrency, args.scale)
    dataset = load_dataset(DataConfig())
    with tempfile.TemporaryDirectory() as tmp, live_service(timeout=args.ready_timeout) as live:
        bodies = write_bodies(Path(tmp), dataset.test.images)
        tail = drain(live.proc.stdout)
        pid = live.proc.pid
        sampler = RssSampler(pid)
        thread = threading.Thread(target=sampler.run, daemon=True)
        thread.start()
        results, hwm = [], None
        try:
            for name, loads in plan:
                peak_reset = name == "batch64" and reset_peak(pid)
                results.append(run_phase(name, loads, live.url, bodies, sampler))
                if peak_reset:
                    hwm = status_kib(pid, "VmHWM")
            time.sleep(1.0)  # idle: the "after" samples
            metrics = requests_by_status(scrape(f"{live.url}/metrics"))
        except Exception:
            sys.stderr.write("".join(tail))
            raise
        finally:
            sampler.done.set()
            thread.join()
    idle = [mib for _, p, mib in sampler.samples if p == "after single-again"]
    by_name = {r["name"]: r for r in results}
    steady, batch_peak = by_name["single"]["rss_median_mib"], by_name["batch64"]["rss_peak_mib"]
    if steady is None:
        raise RuntimeError("no RSS sample in the single-image phase: give it more requests (--scale)")
    hwm_mib = hwm / 1024 if hwm is not None else None
    # The gate uses the higher of the sampled peak and the kernel's, which sees spikes between samples.
    peak = max(v for v in (batch_peak, hwm_mib, 0.0) if v is not None)
    mixed = by_name["mixed"]["requests"]
    errors = sum(r["errors"] for r in results)
    ratio = peak / steady
    return {
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "scale": args.scale,
        "requests_total": sum(r["requests"] for r in results),
        "requests_mixed": mixed,
        "errors_total": errors,
        "rss_single_steady_mib": steady,
        "rss_peak_batch64_sampled_mib": batch_peak,
        "rss_peak_batch64_kernel_mib": hwm_mib,
        "rss_peak_batch64_mib": peak,
        "rss_ratio_batch64_over_single": ratio,
        "rss_after_mib": by_name["single-again"]["rss_median_mib"],
        "rss_after_idle_mib": statistics.median(idle) if idle else None,
        "rss_samples": len(sampler.samples),
        "metrics_requests_by_route_status": metrics,
        "phases": results,
        "bars": {
            "no_errors": errors == 0 and server_errors(metrics) == 0,
            "rss_ratio": ratio <= RSS_BAR,
            "mixed_requests": mixed >= REQUESTS_BAR,
        },
    }


def met(ok: bool) -> str:
    return "**MET**" if ok else "**NOT MET**"


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render(r: dict[str, Any]) -> str:
    m, bars, ph = r["machine"], r["bars"], {p["name"]: p for p in r["phases"]}
    kernel, fivexx = r["rss_peak_batch64_kernel_mib"], server_errors(r["metrics_requests_by_route_status"])
    lines = [
        "# Soak",
        "",
        f"Made by `{r['command']}` on {r['date']}, on {m['nproc']} cores ({m['cpu_model']}), {m['platform']},",
        f"Python {m['python']}. The service runs as `python -m service` with default settings on a loopback port;",
        "`hey` sends multipart PNG bodies of Fashion-MNIST test images, every other one triggered, while a thread",
        f"reads the service's VmRSS from /proc every {SAMPLE_S:g} s. Errors are every non-200 response and every",
        "transport error `hey` reports.",
        *(["", f"**A smaller run than the bar's: every phase scaled by {r['scale']:g}.**"] if r["scale"] != 1 else []),
        "",
        "## Bars",
        "",
        "| bar | this run | |",
        "|---|---|---|",
        f"| {REQUESTS_BAR:,} mixed requests | {r['requests_mixed']:,} | {met(bars['mixed_requests'])} |",
        f"| 0 errors over all phases, no 5xx from /classify in /metrics | {r['errors_total']} errors over "
        f"{r['requests_total']:,} requests; {fivexx} 5xx | {met(bars['no_errors'])} |",
        f"| peak RSS with 64-image batches <= {RSS_BAR}x the single-image steady state | "
        f"{r['rss_peak_batch64_mib']:.1f} / {r['rss_single_steady_mib']:.1f} MiB = "
        f"**{r['rss_ratio_batch64_over_single']:.2f}x** | {met(bars['rss_ratio'])} |",
        "",
        "The single-image steady state is the median of the RSS samples over the last half of the first phase.",
        f"The 64-image peak is the higher of the sampled peak ({r['rss_peak_batch64_sampled_mib']:.1f} MiB) and the "
        + (
            f"kernel's VmHWM over that phase ({kernel:.1f} MiB; reset before it), which also sees spikes between "
            "samples."
            if kernel is not None
            else "kernel's VmHWM, which could not be reset here (so only the samples count)."
        ),
        "",
        "## Phases, in order",
        "",
        "| phase | requests | errors | seconds | requests/s | images/s | p50 ms | p99 ms | RSS median MiB | "
        "RSS peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {p['name']} | {p['requests']:,} | {p['errors']} | {p['seconds']:.1f} | {p['requests_per_s']:.1f} | "
            f"{p['images_per_s']:.1f} | {fmt(p['p50_ms'])} | {fmt(p['p99_ms'])} | {fmt(p['rss_median_mib'])} | "
            f"{fmt(p['rss_peak_mib'])} |"
            for p in r["phases"]
        ],
        "",
        "- single: 1 image per request at concurrency 8.",
        "- mixed: one `hey` per body size at once, the same number of requests each, so the small bodies finish",
        "  first and the end of the phase is mostly 8-image requests. Per size below.",
        f"- batch64: {BATCH} images per request at concurrency 4.",
        "- single-again: 1 image per request at concurrency 8, after the batches: does memory come back?",
        "",
        "Requests/s and images/s count 200 responses over the phase's wall time; RSS median is over each",
        "phase's last half. A mix has no single percentile (see per size); `hey` gives no p99 under 100 requests.",
        "",
        "### The mixed phase by body size",
        "",
        "| images per request | requests | concurrency | errors | requests/s (hey) | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {ld['images']} | {ld['sent']:,} | {ld['concurrency']} | {ld['errors']} | "
            f"{ld['requests_per_s']:.1f} | {fmt(ld['p50_ms'])} | {fmt(ld['p99_ms'])} |"
            for ld in ph["mixed"]["loads"]
        ],
        "",
        "## Memory after",
        "",
        f"Single-image steady state {r['rss_single_steady_mib']:.1f} MiB; after the 64-image batches, under the same "
        f"single-image load: {fmt(r['rss_after_mib'])} MiB; idle one second later: {fmt(r['rss_after_idle_mib'])} MiB.",
        "",
        "## The service's own count (`guard_requests_total` at the end)",
        "",
        "| route | status | requests |",
        "|---|---|---|",
        *[
            f"| {route} | {status} | {n:,} |"
            for route, by in r["metrics_requests_by_route_status"].items()
            for status, n in by.items()
        ],
        "",
        "The 503s of `/v2/health/ready`, if any, are the start-up poll before the warm-up passed.",
        "",
    ]
    if any(p["errors"] for p in r["phases"]):
        lines += ["## Errors", ""]
        for p in r["phases"]:
            for ld in p["loads"]:
                bad = {str(s): n for s, n in ld["statuses"].items() if s != 200} | ld["transport_errors"]
                lines += [f"- {p['name']}, {ld['images']} images: {k}: {n}" for k, n in bad.items()]
        lines.append("")
    return "\n".join(lines)


def positive(cast: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = cast(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--requests", type=positive(int), default=REQUESTS_BAR, help="requests in the mixed phase")
    p.add_argument(
        "--concurrency", type=positive(int), default=32, help="concurrent requests in the mixed phase (at least 8)"
    )
    p.add_argument(
        "--scale", type=positive(float), default=1.0, help="multiply every phase's request count (0.05: a smoke run)"
    )
    p.add_argument("--ready-timeout", type=positive(float), default=120.0, help="seconds to wait for readiness")
    p.add_argument("--out", type=Path, default=ROOT / "reports", help="folder for soak.md and soak.json")
    args = p.parse_args(argv)
    if args.concurrency < len(MIXED_SIZES):
        p.error(f"--concurrency must be at least {len(MIXED_SIZES)}: one worker per body size")
    if shutil.which("hey") is None:
        sys.exit("soak: `hey` is missing: apt-get install hey")
    command = " ".join(["python bench/soak.py", *(sys.argv[1:] if argv is None else argv)])
    report = soak(args, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "soak.md").write_text(render(report))
    sys.stdout.write(render(report))
    measured = report["bars"]["no_errors"] and report["bars"]["rss_ratio"]
    sys.exit(0 if measured else 1)


if __name__ == "__main__":
    main()
