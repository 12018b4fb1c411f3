"""The benchmark, in one run so that ratios hold on a noisy machine: writes reports/benchmark.md and .json.

    python bench/run.py [--requests 2000] [--images 200]

1. the service over HTTP (a real `python -m service` process), single-image requests driven by `hey` at
   concurrency 1, 8 and 32: throughput and p50 / p95 / p99 latency; then the same service with the guard
   off (GUARD_SIGNALS=none), the denominator of the guard's cost; then concurrency 32 alternating between
   the two services a few times, whose medians are the headline (the machine's load drifts over a run);
2. the roofline: every model the guard runs (the autoencoder included) at its raw ONNX Runtime throughput at
   batch 512, weighted by the rows it gets per clean image; the service's efficiency against it, and the
   guard's own in process;
3. peers on the same images: IBM ART's STRIP around the same classifier in PyTorch, and a naive
   per-request PyTorch-eager guard (every model, one image at a time);
4. where the time goes, from the service's own metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import torch

from service.bundle import Bundle, build_pipeline
from service.guard import SIDE_MAX_IMAGES
from service.preprocess import to_model_input
from service.signals.strip import StripSignal
from training.attacks import PRESETS, triggered_pixels, victims
from training.classifier import load_classifier
from training.cost import signal_passes
from training.data import DataConfig, load_dataset
from training.export import torch_models
from training.http_check import encode_png

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 8, 32)
# Clients that send several images per request: the per-request HTTP work is shared by all of them
BATCH_FILES, BATCH_CONCURRENCY = 16, 4
ART_N = 32  # issue 12 compares against ART's STRIP at N = 32
ART_REPEATS = 5  # ART's throughput: the median of this many runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def multipart(*pngs: bytes) -> tuple[bytes, str]:
    """A /classify body carrying each PNG as one `files` part, and its content type."""
    boundary = "backdoorguardbench"
    if any(boundary.encode() in png for png in pngs):
        raise ValueError("a PNG holds the multipart boundary")
    parts = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="bench{i}.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + b"\r\n"
        for i, png in enumerate(pngs)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _hey_rows(url: str, body: Path, content_type: str, n: int, c: int) -> tuple[list[dict[str, str]], float]:
    """One `hey` run: its rows (one per request) and its wall time from the first start to the last end."""
    out = subprocess.run(
        ["hey", "-n", str(n), "-c", str(c), "-m", "POST", "-T", content_type, "-D", str(body), "-o", "csv", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(out)))
    ends = [float(r["offset"]) + float(r["response-time"]) for r in rows]
    return rows, max(ends) - min(float(r["offset"]) for r in rows)


def hey(url: str, bodies: list[Path], content_type: str, n: int, c: int) -> dict[str, Any]:
    """n requests at concurrency c spread over the bodies (different images: the guard's work depends on the
    image, STRIP stopping early on most): c workers at once, each sending its share of the bodies one after
    another, n / len(bodies) requests each through its own `hey -c 1`. Throughput counts each worker's time
    inside `hey` (not the processes' start-up)."""
    from concurrent.futures import ThreadPoolExecutor

    per_body = max(1, n // len(bodies))

    def worker(j: int) -> tuple[list[dict[str, str]], float]:
        rows, busy = [], 0.0
        for body in bodies[j::c]:
            r, wall = _hey_rows(url, body, content_type, per_body, 1)
            rows += r
            busy += wall
        return rows, busy

    with ThreadPoolExecutor(c) as pool:
        done = list(pool.map(worker, range(c)))
    rows = [r for rs, _ in done for r in rs]
    wall = max(busy for _, busy in done)
    ok = [r for r in rows if r["status-code"] == "200"]
    latency = np.array([float(r["response-time"]) for r in ok])
    return {
        "concurrency": c,
        "requests": len(rows),
        "errors": len(rows) - len(ok),
        "throughput_rps": len(ok) / wall,
        "p50_ms": 1000 * float(np.percentile(latency, 50)),
        "p95_ms": 1000 * float(np.percentile(latency, 95)),
        "p99_ms": 1000 * float(np.percentile(latency, 99)),
    }


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {series: value} (counters and histogram sums/counts)."""
    values = {}
    for line in httpx.get(url).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


@contextlib.contextmanager
def running_service(signals: str) -> Iterator[str]:
    """A `python -m service` on a free loopback port with GUARD_SIGNALS=`signals`, ready: its base URL."""
    port = free_port()
    env = {**os.environ, "GUARD_HOST": "127.0.0.1", "GUARD_PORT": str(port), "GUARD_LOG_LEVEL": "warning",
           "GUARD_SIGNALS": signals}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the service did not become ready")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def body_files(folder: Path, name: str, pngs: list[bytes], per_body: int = 1) -> list[Path]:
    """/classify bodies in a file each (what `hey -D` sends): each PNG alone, or with per_body > 1 as many
    bodies as PNGs, body i carrying the per_body PNGs from the i-th on (wrapping round), so every image is
    sent equally often."""
    paths = []
    for i in range(len(pngs)):
        body, _ = multipart(*[pngs[(i + j) % len(pngs)] for j in range(per_body)])
        paths.append(folder / f"{name}{i}")
        paths[-1].write_bytes(body)
    return paths


def service_runs(
    base: str, bodies: list[Path], requests: int, triggered: list[Path] | None = None
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The service at `base` over HTTP at each concurrency on `bodies` (clean traffic), then, if given, on
    `triggered` at concurrency 32; and the change of its metrics over the measured runs."""
    content_type = multipart(b"")[1]
    hey(f"{base}/classify", bodies[:8], content_type, 200, 8)  # warm-up
    before = scrape(f"{base}/metrics")
    runs = []
    plan = [("clean", c, bodies) for c in CONCURRENCY] + ([("triggered", 32, triggered)] if triggered else [])
    for traffic, c, paths in plan:
        start = scrape(f"{base}/metrics")
        run = hey(f"{base}/classify", paths, content_type, requests, c)
        end = scrape(f"{base}/metrics")
        batches = end["guard_batch_size_images_count"] - start["guard_batch_size_images_count"]
        images = end["guard_batch_size_images_sum"] - start["guard_batch_size_images_sum"]
        run["mean_batch_images"] = images / batches
        # the guard's (or the plain classifier's) batch compute per image, by the service's own metrics
        compute = end["guard_batch_compute_seconds_sum"] - start["guard_batch_compute_seconds_sum"]
        run["compute_ms_per_image"] = 1000 * compute / images
        run["traffic"] = traffic
        runs.append(run)
    after = scrape(f"{base}/metrics")
    return runs, {k: after[k] - before.get(k, 0.0) for k in after}


def paired_runs(
    guarded: str, plain: str, bodies: list[Path], requests: int, pairs: int, concurrency: int = 32, per_body: int = 1
) -> dict[str, Any]:  # fmt: skip
    """The clean bodies (per_body images each) at `concurrency`, alternating between the guarded and the plain
    service `pairs` times: the machine's load drifts over a run, and a pair measured back to back shares it.
    The medians of the images/s, of the p50 latencies and of the per-pair ratios of both."""
    content_type = multipart(b"")[1]
    rows = []
    for _ in range(pairs):
        on = hey(f"{guarded}/classify", bodies, content_type, requests, concurrency)
        off = hey(f"{plain}/classify", bodies, content_type, requests, concurrency)
        rows.append({
            "guarded": per_body * on["throughput_rps"], "unguarded": per_body * off["throughput_rps"],
            "ratio": on["throughput_rps"] / off["throughput_rps"], "errors": on["errors"] + off["errors"],
            "p50_guarded": on["p50_ms"], "p50_unguarded": off["p50_ms"], "p50_ratio": on["p50_ms"] / off["p50_ms"],
        })  # fmt: skip
    return {
        "pairs": rows,
        "requests": requests,
        "concurrency": concurrency,
        "images_per_request": per_body,
        **{f"median_{k}": float(np.median([r[k] for r in rows])) for k in rows[0] if k != "errors"},
    }


def stage_breakdown(delta: dict[str, float]) -> dict[str, float]:
    """Milliseconds per image per stage over the measured runs."""
    images = sum(v for k, v in delta.items() if k.startswith("guard_images_total"))
    out = {}
    for key, value in delta.items():
        m = re.fullmatch(r'guard_stage_seconds_total\{stage="([^"]+)"\}', key)
        if m:
            out[m.group(1)] = 1000 * value / images
    for name in ("decode", "queue_wait", "encode"):
        out[name] = 1000 * delta[f"guard_{name}_seconds_sum"] / images
    out["batch_compute"] = 1000 * delta["guard_batch_compute_seconds_sum"] / images
    out["mean_batch_size"] = delta["guard_batch_size_images_sum"] / delta["guard_batch_size_images_count"]
    return out


def passes_per_image(bundle: Bundle) -> dict[str, float]:
    """Passes through a classifier-sized model per guarded image, per signal and in all (the image itself is one):
    what each signal's `prepare` hands its model for one image. The autoencoders are extra, not counted."""
    out = {"image": 1.0, **{name: float(n) for name, n in signal_passes(bundle).items()}}
    out["total"] = sum(out.values())
    return out


AUTOENCODERS = {"detrigger": "detrigger_ae", "masked_ae": "masked_ae"}  # restoration signal -> its bundle model


def measured_passes(bundle: Bundle, sets: dict[str, np.ndarray]) -> dict[str, Any]:
    """Rows per image through every model the service's guard runs (STRIP stopping early where it can), counted
    row by row over each set of model inputs: passes through classifier-sized models (the image, the
    de-triggered image, STRIP's overlays, the repaired model, the expert) and through the autoencoders; and how
    many images ran each number of STRIP overlays (bundles that run STRIP)."""
    guard = build_pipeline(bundle)
    rows: dict[str, int] = {}

    def counted(name: str, model: Any) -> Any:
        def run(x: np.ndarray) -> Any:
            rows[name] = rows.get(name, 0) + len(x)
            return model(x)

        return run

    guard.models = {name: counted(name, model) for name, model in guard.models.items()}
    guard.classify = guard.models["classifier"]
    for signal in guard.signals:  # the restoration signals' autoencoders, by their bundle model
        if signal.name in AUTOENCODERS:
            signal.restore = counted(AUTOENCODERS[signal.name], signal.restore)  # type: ignore[attr-defined]
    out: dict[str, Any] = {}
    for name, x in sets.items():
        rows.clear()
        results = guard.run_chunked(x, 64)
        per_model = {model: n / len(x) for model, n in rows.items()}
        out[name] = {
            "images": len(x),
            "passes_per_image": sum(v for m, v in per_model.items() if m in guard.models),
            "rows_per_image": per_model,
        }
        if "strip" in bundle.signal_names:
            overlays = np.concatenate([r.signals["strip"].evidence["overlays"] for r in results])
            values, counts = np.unique(overlays, return_counts=True)
            out[name]["strip_overlays"] = {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}
    return out


def raw_images_per_s(path: Path, images: np.ndarray, batch: int = 512, reps: int = 10) -> float:
    """Raw ONNX Runtime throughput of one model at `batch` (ONNX Runtime's default threads and spinning): the
    fastest of `reps` calls, as a ceiling should be (the machine's other load only ever slows a call down)."""
    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))}
    session.run(None, feed)
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, feed)
        seconds.append(time.perf_counter() - start)
    return batch / min(seconds)


def roofline(bundle: Bundle, images: np.ndarray, measured: dict[str, Any]) -> dict[str, Any]:
    """The guard's compute floor: each model it runs at its raw batch-512 throughput, times the rows per clean
    image it gets (measured_passes), summed. Also the figure counting classifier passes only, as before the
    autoencoder was counted (it makes the roofline higher than the guard can reach)."""
    files = bundle.manifest["files"]
    models = {
        name: {"rows_per_image": per, "images_per_s": raw_images_per_s(bundle.root / files[name]["path"], images)}
        for name, per in measured["rows_per_image"].items()
    }
    seconds = sum(m["rows_per_image"] / m["images_per_s"] for m in models.values())
    classifier = models["classifier"]["images_per_s"]
    return {
        "classifier_images_per_s": classifier,
        "passes_per_image": measured["passes_per_image"],
        "models": models,
        "guarded_images_per_s": 1 / seconds,
        "classifier_passes_only_images_per_s": classifier / measured["passes_per_image"],
    }


def in_process(
    bundle: Bundle, images: np.ndarray, batches: tuple[int, ...] = (16, 256), reps: int = 3
) -> dict[str, float]:
    """The service's guard pipeline called directly (no HTTP, no decode), clean images in batches of each size:
    images/s, the best of `reps` passes over them (the machine's other load only ever slows a pass down).
    Batch 16 is about what the service batches at concurrency 32."""
    guard = build_pipeline(bundle)
    out = {}
    for batch in batches:
        guard.run(images[:batch])
        seconds = []
        for _ in range(reps):
            start = time.perf_counter()
            for i in range(0, len(images) - batch + 1, batch):
                guard.run(images[i : i + batch])
            seconds.append(time.perf_counter() - start)
        out[str(batch)] = (len(images) // batch) * batch / min(seconds)
    return out


def art_strip(
    model: torch.nn.Module, calibration: np.ndarray, images: np.ndarray, n: int, repeats: int = ART_REPEATS
) -> dict[str, Any]:
    """IBM ART's STRIP over `images`, `repeats` times: images_per_s is the median run (one run of a second or two
    moves with the machine's load by more than the bar's margin), the runs beside it."""
    import logging

    from art.defences.transformer.poisoning import STRIP
    from art.estimators.classification import PyTorchClassifier

    logging.getLogger("art").setLevel(logging.ERROR)

    class Probabilities(torch.nn.Module):
        """ART's STRIP takes the model's outputs as probabilities (scipy's entropy of them)."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.inner(x)[0], dim=1)

    classifier = PyTorchClassifier(
        Probabilities(model),
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(1, 28, 28),
        nb_classes=10,
        clip_values=(0, 1),
    )
    defended = STRIP(classifier)(num_samples=n)
    defended.mitigate(calibration)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        defended.predict(images)
        runs.append(len(images) / (time.perf_counter() - start))
    return {"images": len(images), "images_per_s": float(np.median(runs)), "runs": runs}


def art_detection(suite: dict[str, Any] | None, n: int, images: int) -> dict[str, dict[str, float]]:
    """ART's STRIP as a score beside the guard's fused verdict, per suite attack: ART's algorithm (each image
    blended half and half with n clean images, the mean entropy of the predictions; low = triggered) over the
    bundle's own bank and classifier, AUROC on the first `images` test images and their triggered victims,
    next to the fused AUROC of reports/attack_suite.json. Attacks whose bundle is not built are left out."""
    from training.metrics import auroc, strip_entropies
    from training.suite import EVAL_ROOT, SUITE

    if suite is None:
        return {}
    ds = load_dataset(DataConfig())
    pixels, labels = ds.test.images[:images], ds.test.labels[:images]
    clean_x, out = to_model_input(pixels), {}
    for name, entry in suite["attacks"].items():
        root = ROOT / "models" if name == "kwon" else EVAL_ROOT / name / "bundle"
        if not (root / "manifest.json").is_file():
            continue
        bundle = Bundle.load(root)
        attack = PRESETS[SUITE[name].preset]
        clean, _ = strip_entropies(bundle, clean_x, n, blend="mean")
        triggered, _ = strip_entropies(
            bundle, to_model_input(triggered_pixels(pixels[victims(labels, attack)], attack)), n, blend="mean"
        )
        # low entropy = triggered: minus the entropy is the score
        out[name] = {"art_strip_auroc": auroc(-clean, -triggered), "fused_auroc": entry["fused"]["auroc"]}
    return out


@torch.no_grad()
def naive_guard(bundle_root: Path, bank: np.ndarray, images: np.ndarray, n: int) -> dict[str, float]:
    """Every model of the default signals in PyTorch eager, one request (image) at a time: what a first
    prototype would do. n: STRIP's overlays per image (0: a bundle without STRIP)."""
    models = torch_models(bundle_root)
    classifier, detrigger = models["classifier"], models["detrigger_ae"]
    others = [models[k] for k in ("repaired_classifier", "backdoor_expert") if k in models]
    overlays = torch.from_numpy(bank[:n])
    start = time.perf_counter()
    for image in images:
        x = torch.from_numpy(image[None])
        classifier(x)
        classifier(detrigger(x))
        if n:
            torch.softmax(classifier(x + overlays)[0], 1)
        for model in others:
            model(x)
    return {"images": len(images), "images_per_s": len(images) / (time.perf_counter() - start)}


def clean_runs(runs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The runs on clean traffic (the headline's), by concurrency."""
    return {run["concurrency"]: run for run in runs if run.get("traffic", "clean") == "clean"}


def _passes_paragraph(r: dict[str, Any]) -> list[str]:
    """Passes per image as measured, and how STRIP's early exit spent its overlays when the bundle runs STRIP."""
    mp = r["measured_passes"]
    counted = (
        "Passes per image through classifier-sized models (the image, the de-triggered image"
        + (", STRIP's overlays" if r["strip_rounds"] else "")
        + ", the repaired model, the expert), counted in process on the first "
        f"{mp['clean']['images']} test images: **{mp['clean']['passes_per_image']:.2f}** per clean image, "
        f"**{mp['triggered']['passes_per_image']:.2f}** per triggered one (kwon)"
    )
    if not r["strip_rounds"]:
        return [
            counted + f"; {r['passes']['total']:g} by the signals' own count. The bundle runs no STRIP (make cost: "
            "the set without it is within 0.5 point of every suite figure with it, reports/cost.md); IBM ART's "
            "STRIP below is the peer the issue names, at N = 32 and at the N the bundle's STRIP config holds."
        ]
    return [
        "STRIP stops early (service/guard.py, `GuardPipeline._finish_strip`): after "
        + ", ".join(map(str, r["strip_rounds"][:-1]))
        + " overlays it bounds",
        "the entropy the remaining ones can add (between 0 and log2 C each) and stops an image whose fused verdict",
        "none of them can change, so every verdict is the one all N overlays give (tests/service/",
        "test_strip_early_exit.py). "
        + counted
        + f", against {r['passes']['total']:g} with every overlay (STRIP N = {r['strip_n']}). Images by STRIP "
        "overlays run: clean "
        + ", ".join(f"{k}: {v}" for k, v in mp["clean"]["strip_overlays"].items())
        + "; triggered "
        + ", ".join(f"{k}: {v}" for k, v in mp["triggered"]["strip_overlays"].items())
        + ".",
    ]


def headline(r: dict[str, Any]) -> dict[str, float]:
    """The keys issue 12 names, from the runs: throughput from the alternating runs at concurrency 32 (their
    medians; the share is the median of the pairs' ratios), latency from the alternating runs at concurrency 1
    (the same medians; reports made before those runs existed: the service's single runs at concurrency 1)."""
    guarded, plain = clean_runs(r["service"]), clean_runs(r["service_unguarded"])
    c1 = r.get("paired_c1")
    p50_on, p50_off = (
        (c1["median_p50_guarded"], c1["median_p50_unguarded"]) if c1 else (guarded[1]["p50_ms"], plain[1]["p50_ms"])
    )
    roof, paired, batched = r["roofline"], r["paired_c32"], r.get("paired_batched")
    on = paired["median_guarded"]
    bound = serial_bound(paired["median_unguarded"], roof["guarded_images_per_s"])
    many = {}
    if batched:  # clients sending several images per request (older reports have no such run)
        many = {
            "batched_images_per_request": batched["images_per_request"],
            "batched_concurrency": batched["concurrency"],
            "batched_guarded_images_per_s": batched["median_guarded"],
            "batched_unguarded_images_per_s": batched["median_unguarded"],
            "batched_share_of_unguarded": batched["median_ratio"],
            "batched_roofline_efficiency": batched["median_guarded"] / roof["guarded_images_per_s"],
        }
    return many | {
        "guarded_images_per_s": on,
        "unguarded_images_per_s": paired["median_unguarded"],
        "guarded_share_of_unguarded": paired["median_ratio"],
        "passes_per_image": roof["passes_per_image"],  # measured on clean images (STRIP stopping early)
        "passes_per_image_triggered": r["measured_passes"]["triggered"]["passes_per_image"],
        "roofline_images_per_s": roof["guarded_images_per_s"],
        "roofline_efficiency": on / roof["guarded_images_per_s"],
        # the guard's own compute against the same roofline, without the HTTP stack (batch 16: the service's
        # batch at concurrency 32)
        "in_process_images_per_s_b16": r["in_process"]["16"],
        "in_process_efficiency_b16": r["in_process"]["16"] / roof["guarded_images_per_s"],
        "art_strip_images_per_s": r["art"]["images_per_s"],
        "over_art_strip": on / r["art"]["images_per_s"],
        "art_strip_n32_images_per_s": r["art_n32"]["images_per_s"],
        "over_art_strip_n32": on / r["art_n32"]["images_per_s"],
        # like for like: the guard and ART's STRIP both called in process (ART predicts all its images in one call;
        # the guard's batch of 256), neither behind HTTP
        "in_process_over_art_strip_n32": r["in_process"]["256"] / r["art_n32"]["images_per_s"],
        # The HTTP stack and the guard share the cores: an image costs the unguarded service's time per image plus
        # the guard's roofline time (its classifier pass counted in both), so the service can reach at most this
        "serial_bound_images_per_s": bound,
        "share_of_serial_bound": on / bound,
        "p50_ms_c1_guarded": p50_on,
        "p50_ms_c1_unguarded": p50_off,
        "p50_c1_ratio": c1["median_p50_ratio"] if c1 else p50_on / p50_off,
    }


def serial_bound(unguarded: float, roofline: float) -> float:
    """Images/s of a service whose every image costs the unguarded service's time (HTTP, decode, one classifier
    pass) and then the guard's at its roofline, on the same cores, one after the other."""
    return 1 / (1 / unguarded + 1 / roofline)


def detection_per_cost(passes: dict[str, float], suite: dict[str, Any] | None) -> list[str]:
    """Each signal's passes per image beside its AUROC per suite attack (reports/attack_suite.json, made by
    `make evaluate`) and what the fused TPR loses without it."""
    if suite is None:
        return ["No reports/attack_suite.json: run `make evaluate` for the detection side of this table.", ""]
    attacks = {k: v for k, v in suite["attacks"].items()}
    names = [n for n in passes if n not in ("image", "total")]
    lines = [
        "Detection from `" + suite.get("command", "make evaluate") + "` (reports/attack_suite.json); cost from this "
        "run. Each cell: the signal's AUROC alone / fused TPR points lost without it.",
        "",
        "| signal | passes per image | " + " | ".join(attacks) + " |",
        "|---|---|" + "---|" * len(attacks),
    ]
    for name in names:
        cells = []
        for a in attacks.values():
            auroc = a["signals"].get(name, {}).get("auroc")
            without = a.get("ablation", {}).get(f"without {name}")
            lost = 100 * (a["ablation"]["all"]["tpr"] - without["tpr"]) if without else None
            cells.append(("-" if auroc is None else f"{auroc:.3f}") + ("" if lost is None else f" / {lost:+.1f}"))
        lines.append(f"| {name} | {passes[name]:g} | " + " | ".join(cells) + " |")
    lines += [f"| all (with the image) | {passes['total']:g} | " + " | ".join(
        f"fused TPR {100 * a['fused']['tpr']:.1f}%" for a in attacks.values()) + " |", ""]  # fmt: skip
    return lines


def _ae_rows(roof: dict[str, Any]) -> float:
    """Autoencoder passes per image in the roofline."""
    return sum(v["rows_per_image"] for m, v in roof["models"].items() if m in AUTOENCODERS.values())


def render(r: dict[str, Any]) -> str:
    roof = r["roofline"]
    h = headline(r)
    lines = [
        "# Benchmark",
        "",
        f"Made by `{r['command']}` in one run on this machine ({r['machine']}), so that the ratios hold even",
        "though absolute numbers move with the machine's load. The service runs as `python -m service` with the",
        f"shipped bundle (signals {', '.join(r['signals'])}); `hey` sends single-image PNG",
        "requests of 32 clean test images drawn at random (the traffic a guard mostly sees; the guard's work depends",
        "on the image, so one image repeated would not do), then 32 triggered ones. The same service with",
        "`GUARD_SIGNALS=none` (plain inference through the same stack: one classifier pass, no verdict) on the same",
        "clean images is the denominator.",
        "",
        *_passes_paragraph(r),
        "",
        "## The bar (issue 12)",
        "",
        "| goal | measured | met? |",
        "|---|---|---|",
        f"| guarded >= 50% of unguarded images/s at concurrency 32 (medians of {len(r['paired_c32']['pairs'])} "
        f"alternating pairs) | {h['guarded_images_per_s']:.1f} / {h['unguarded_images_per_s']:.1f}; median ratio "
        f"{100 * h['guarded_share_of_unguarded']:.0f}% | {_met(h['guarded_share_of_unguarded'] >= 0.5)} |",
        f"| >= 0.8 of the roofline ({h['passes_per_image']:.2f} classifier passes and "
        f"{_ae_rows(roof):.2f} autoencoder passes per clean image) | "
        f"{h['roofline_efficiency']:.2f} | {_met(h['roofline_efficiency'] >= 0.8)} |",
        f"| ... the guard in process at batch 16, no HTTP (the service's batch at concurrency 32) | "
        f"{h['in_process_efficiency_b16']:.2f} | {_met(h['in_process_efficiency_b16'] >= 0.8)} |",
        *_batched_bar(h),
        f"| >= 5x ART's STRIP (N = {ART_N}, as the issue names it) | {h['over_art_strip_n32']:.1f}x | "
        f"{_met(h['over_art_strip_n32'] >= 5)} |",
        f"| ... the guard in process at batch 256 against ART in process, neither behind HTTP | "
        f"{h['in_process_over_art_strip_n32']:.1f}x | {_met(h['in_process_over_art_strip_n32'] >= 5)} |",
        f"| the same at N = {r['strip_n']} (the bundle's STRIP config) | {h['over_art_strip']:.1f}x | "
        f"{_met(h['over_art_strip'] >= 5)} |",
        f"| ... while detecting at least as well on every suite attack (AUROC below) | {_art_worse(r)} | "
        f"{_met(bool(r.get('art_detection')) and _art_worse(r) == 'on none')} |",
        f"| p50 single-image latency guarded <= 2x unguarded{_c1_pairs(r)} | {h['p50_ms_c1_guarded']:.1f} ms / "
        f"{h['p50_ms_c1_unguarded']:.1f} ms; {h['p50_c1_ratio']:.2f}x | {_met(h['p50_c1_ratio'] <= 2)} |",
        "",
        "## The service over HTTP",
        "",
        "| guard | traffic | concurrency | requests | errors | images/s | p50 ms | p95 ms | p99 ms "
        "| images per batch | batch compute ms per image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {guard} | {run.get('traffic', 'clean')} | {run['concurrency']} | {run['requests']} | {run['errors']} | "
            f"{run['throughput_rps']:.1f} | "
            f"{run['p50_ms']:.1f} | {run['p95_ms']:.1f} | {run['p99_ms']:.1f} | {run['mean_batch_images']:.1f} | "
            + (f"{run['compute_ms_per_image']:.2f} |" if "compute_ms_per_image" in run else "— |")
            for guard, key in (("on", "service"), ("off", "service_unguarded"))
            for run in r[key]
        ],
        "",
        f"Concurrency 32, the two services alternating ({r['paired_c32']['requests']} requests each; the machine's "
        "load drifts over a run, and the two runs of a pair share it):",
        "",
        "| pair | guarded images/s | unguarded images/s | ratio |",
        "|---|---|---|---|",
        *[
            f"| {i + 1} | {p['guarded']:.1f} | {p['unguarded']:.1f} | {100 * p['ratio']:.0f}% |"
            for i, p in enumerate(r["paired_c32"]["pairs"])
        ],
        "",
        *_batched_section(r, h),
        "## Against the roofline and the peers",
        "",
        "| | images/s | service at concurrency 32 (the pairs' median) / this |",
        "|---|---|---|",
        "| roofline: every model the guard runs, at its raw ONNX Runtime throughput at batch 512 ("
        + ", ".join(
            f"{m} {v['images_per_s']:.0f} images/s x {v['rows_per_image']:.2f}" for m, v in roof["models"].items()
        )
        + f" per image) | {roof['guarded_images_per_s']:.1f} | efficiency **{h['roofline_efficiency']:.2f}** |",
        f"| the unguarded service's time per image and the roofline's added (the HTTP stack and the guard on the "
        f"same cores, one after the other; the classifier pass counted in both) | "
        f"{h['serial_bound_images_per_s']:.1f} | **{h['share_of_serial_bound']:.2f}** |",
        f"| the same counting classifier passes only (the classifier / {roof['passes_per_image']:.2f}; the "
        f"report's roofline before this one) | {roof['classifier_passes_only_images_per_s']:.1f} | "
        f"{h['guarded_images_per_s'] / roof['classifier_passes_only_images_per_s']:.2f} |",
        *[
            f"| the guard in process (GuardPipeline.run, no HTTP or decode) at batch {b} | {v:.1f} "
            f"({v / roof['guarded_images_per_s']:.2f} of the roofline) | {h['guarded_images_per_s'] / v:.2f} |"
            for b, v in r["in_process"].items()
        ],
        f"| IBM ART STRIP (N = {r['strip_n']}) on the same classifier in PyTorch{_runs(r['art'])} | "
        f"{r['art']['images_per_s']:.1f} | **{h['over_art_strip']:.1f}x** |",
        f"| IBM ART STRIP (N = {ART_N}) on the same classifier in PyTorch{_runs(r['art_n32'])} | "
        f"{r['art_n32']['images_per_s']:.1f} | "
        f"**{h['over_art_strip_n32']:.1f}x** |",
        f"| naive per-request PyTorch-eager guard (the same signals) | {r['naive']['images_per_s']:.1f} | "
        f"**{h['guarded_images_per_s'] / r['naive']['images_per_s']:.1f}x** |",
        "",
        *_art_table(r),
        "## Detection per cost",
        "",
        *detection_per_cost(r["passes"], r.get("suite")),
        "## Where the time goes (ms per image, from the guarded service's metrics over the runs above)",
        "",
        "| stage | ms per image |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in r["stages"].items() if k != "mean_batch_size"],
        "",
        f"Mean batch size over all the guarded runs: {r['stages']['mean_batch_size']:.1f} images.",
        *(
            [
                f"Batches of at most {SIDE_MAX_IMAGES} images (service.guard.SIDE_MAX_IMAGES) run on the guard's "
                "twin over sessions with half the intra-op threads, the models other than the classifier on a side "
                "thread beside the autoencoder and the classifier: their stages overlap the others there, and "
                "`side_wait` is what the guard's thread still waited for them after its classifier call.",
            ]
            if "side_wait" in r["stages"]
            else []
        ),
        "",
    ]
    return "\n".join(lines)


def _batched_bar(h: dict[str, Any]) -> list[str]:
    if "batched_roofline_efficiency" not in h:
        return []
    return [
        f"| ... over HTTP with {h['batched_images_per_request']} images per request (concurrency "
        f"{h['batched_concurrency']}) | {h['batched_roofline_efficiency']:.2f} | "
        f"{_met(h['batched_roofline_efficiency'] >= 0.8)} |"
    ]


def _batched_section(r: dict[str, Any], h: dict[str, Any]) -> list[str]:
    """The alternating runs of multi-image requests: what the per-request HTTP work costs once shared."""
    if "batched_roofline_efficiency" not in h:
        return []
    b = r["paired_batched"]
    return [
        f"{b['images_per_request']} images per request at concurrency {b['concurrency']}, the two services "
        f"alternating ({b['requests']} requests each): the per-request HTTP work (parsing, routing, the response) "
        f"is shared by {b['images_per_request']} images. Guarded {h['batched_guarded_images_per_s']:.1f} images/s, "
        f"{h['batched_roofline_efficiency']:.2f} of the roofline and "
        f"{100 * h['batched_share_of_unguarded']:.0f}% of the unguarded service's "
        f"{h['batched_unguarded_images_per_s']:.1f} (medians):",
        "",
        "| pair | guarded images/s | unguarded images/s | ratio | failed requests |",
        "|---|---|---|---|---|",
        *[
            f"| {i + 1} | {p['guarded']:.1f} | {p['unguarded']:.1f} | {100 * p['ratio']:.0f}% | {p.get('errors', 0)} |"
            for i, p in enumerate(b["pairs"])
        ],
        "",
    ]


def _art_worse(r: dict[str, Any]) -> str:
    """The suite attacks on which ART's STRIP separates better than the guard's fused verdict."""
    rows = r.get("art_detection") or {}
    if not rows:
        return "not measured (no suite bundles)"
    worse = [name for name, d in rows.items() if d["art_strip_auroc"] > d["fused_auroc"]]
    return "on " + (", ".join(worse) if worse else "none")


def _art_table(r: dict[str, Any]) -> list[str]:
    rows = r.get("art_detection") or {}
    if not rows:
        return []
    return [
        f"ART's STRIP (N = {ART_N}, its half-and-half blend) as a score on each suite bundle's classifier and bank, "
        f"first {r.get('art_detection_images')} test images and their triggered victims, beside the guard's fused "
        "AUROC (reports/attack_suite.json):",
        "",
        "| attack | ART STRIP AUROC | guard fused AUROC |",
        "|---|---|---|",
        *[f"| {name} | {d['art_strip_auroc']:.4f} | {d['fused_auroc']:.4f} |" for name, d in rows.items()],
        "",
    ]


def _c1_pairs(r: dict[str, Any]) -> str:
    """How the p50 ratio was measured, for the bar's row."""
    c1 = r.get("paired_c1")
    if not c1:
        return ""
    ratios = ", ".join(f"{p['p50_ratio']:.2f}" for p in c1["pairs"])
    return f" (medians of {len(c1['pairs'])} alternating pairs at concurrency 1; the pairs' ratios {ratios})"


def _runs(peer: dict[str, Any]) -> str:
    """How a peer's throughput was taken, for its row: the median of its runs, and their range."""
    runs = peer.get("runs") or []
    if len(runs) < 2:
        return ""
    return f" (the median of {len(runs)} runs, {min(runs):.1f} to {max(runs):.1f})"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    p.add_argument("--images", type=int, default=200, help="images for the in-process peers")
    p.add_argument("--pass-images", type=int, default=2000, help="test images whose guard passes are counted")
    p.add_argument("--detection-images", type=int, default=1000, help="test images per attack for ART's AUROC")
    p.add_argument("--pairs", type=int, default=5, help="alternating guarded/unguarded runs at concurrency 32")
    p.add_argument("--out", type=Path, default=ROOT / "reports")
    args = p.parse_args(argv)
    if shutil.which("hey") is None:
        sys.exit("bench: `hey` is missing: apt-get install hey")
    bundle = Bundle.load(ROOT / "models")
    n = int(bundle.manifest["configs"]["strip"]["n"])  # ART's at the bundle's STRIP N, whether it runs STRIP or not
    strip = next((s for s in build_pipeline(bundle).signals if isinstance(s, StripSignal)), None)
    ds = load_dataset(DataConfig())
    kwon = PRESETS["kwon"]
    # the traffic: 32 clean test images drawn at random (seeded), and 32 non-target ones with the kwon trigger
    chosen = np.random.default_rng(0).choice(victims(ds.test.labels, kwon), 32, replace=False)
    clean_pngs = [encode_png(p) for p in ds.test.images[chosen]]
    triggered_pngs = [encode_png(p) for p in triggered_pixels(ds.test.images[chosen], kwon)]
    images = to_model_input(ds.test.images[: args.images])
    calibration = to_model_input(ds.calibration.images[: args.images])
    suite_path = args.out / "attack_suite.json"

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, running_service("all") as on, running_service("none") as off:
        clean_bodies = body_files(Path(tmp), "clean", clean_pngs)
        service, delta = service_runs(on, clean_bodies, args.requests, body_files(Path(tmp), "trig", triggered_pngs))
        unguarded, _ = service_runs(off, clean_bodies, args.requests)
        paired = paired_runs(on, off, clean_bodies, args.requests // 2, args.pairs)
        latency = paired_runs(on, off, clean_bodies, args.requests // 2, args.pairs, concurrency=1)
        many = body_files(Path(tmp), "many", clean_pngs, BATCH_FILES)
        batched = paired_runs(on, off, many, args.requests // 4, 3, BATCH_CONCURRENCY, BATCH_FILES)
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_classifier(bundle.root / bundle.manifest["checkpoints"]["classifier"]["path"])
    passes = passes_per_image(bundle)
    test = ds.test.images[: args.pass_images]
    stamped = triggered_pixels(test[victims(ds.test.labels[: args.pass_images], kwon)], kwon)
    measured = measured_passes(bundle, {"clean": to_model_input(test), "triggered": to_model_input(stamped)})
    report: dict[str, Any] = {
        "command": " ".join(["python bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, onnxruntime {ort.__version__}, "
        f"torch {torch.__version__}",
        "strip_n": n,
        "strip_rounds": list(strip.rounds) if strip is not None else None,  # None: the bundle runs no STRIP
        "signals": bundle.signal_names,
        "passes": passes,
        "measured_passes": measured,
        "service": service,
        "service_unguarded": unguarded,
        "paired_c32": paired,
        "paired_c1": latency,
        "paired_batched": batched,
        "stages": stage_breakdown(delta),
        "roofline": roofline(bundle, images, measured["clean"]),
        "in_process": in_process(bundle, to_model_input(test)),
        "art": art_strip(model, calibration, images, n),
        "art_n32": art_strip(model, calibration, images, ART_N),
        "naive": naive_guard(bundle.root, bundle.strip_bank, images, n if strip is not None else 0),
    }
    report["suite"] = json.loads(suite_path.read_text()) if suite_path.is_file() else None
    report["art_detection"] = art_detection(report["suite"], ART_N, args.detection_images)
    report["art_detection_images"] = args.detection_images
    report["seconds"] = time.perf_counter() - start
    report.update(headline(report))
    args.out.mkdir(parents=True, exist_ok=True)
    text = render(report)
    del report["suite"]  # its own file; the table above quotes it
    (args.out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "benchmark.md").write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
