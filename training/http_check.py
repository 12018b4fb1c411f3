"""The service's bar, measured as a user sees it: Fashion-MNIST test images sent as PNG files to /classify.

    python -m training.http_check --url http://127.0.0.1:8000 [--limit N] [--out reports/http_check.json]

Sends every clean test image and every triggered non-target one (the `kwon` trigger, stamped with the
repo's one `stamp`), in requests of --files-per-request images, and reports what came back.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from training.attacks import PRESETS, AttackConfig, triggered_pixels, victims
from training.data import DataConfig, load_fashion_mnist

log = logging.getLogger(__name__)


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def post_all(client: httpx.Client, images: np.ndarray, per_request: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for start in range(0, len(images), per_request):
        batch = images[start : start + per_request]
        files = [("files", (f"{start + i}.png", encode_png(p), "image/png")) for i, p in enumerate(batch)]
        response = client.post("/classify", files=files)
        response.raise_for_status()
        results.extend(response.json()["results"])
    return results


def measure(
    client: httpx.Client, images: np.ndarray, labels: np.ndarray, attack: AttackConfig, per_request: int = 32
) -> dict[str, Any]:
    """The bar's five figures (plus context) from the service's answers."""
    idx = victims(labels, attack)
    start = time.perf_counter()
    clean = post_all(client, images, per_request)
    dirty = post_all(client, triggered_pixels(images[idx], attack), per_request)
    seconds = time.perf_counter() - start
    y, yt = labels, labels[idx]
    target = attack.target

    def share(rs: list[dict[str, Any]], key: str, want: np.ndarray | None = None) -> float:
        values = np.array([r[key] for r in rs])
        return float(np.mean(values if want is None else values == want))

    return {
        "clean_images": len(clean),
        "triggered_images": len(dirty),
        "triggered_flagged": share(dirty, "backdoor"),
        "clean_flagged": share(clean, "backdoor"),
        "clean_accuracy_guarded": share(clean, "label", y),
        "clean_accuracy_undefended": float(np.mean([r["original"]["label"] for r in clean] == y)),
        "triggered_true_label": share(dirty, "label", yt),
        "triggered_attacker_label": share(dirty, "label", np.full(len(yt), target)),
        "attack_success_undefended": float(
            np.mean([r["original"]["label"] for r in dirty] == np.full(len(yt), target))
        ),
        "seconds": round(seconds, 1),
    }


def bars(m: dict[str, Any]) -> dict[str, bool]:
    return {
        "triggered flagged >= 98%": m["triggered_flagged"] >= 0.98,
        "clean flagged <= 2%": m["clean_flagged"] <= 0.02,
        "clean accuracy >= undefended - 1 point": m["clean_accuracy_guarded"] >= m["clean_accuracy_undefended"] - 0.01,
        "triggered true label >= 88%": m["triggered_true_label"] >= 0.88,
        "triggered attacker's label <= 1%": m["triggered_attacker_label"] <= 0.01,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.http_check", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the running service")
    p.add_argument("--limit", type=int, default=None, help="first N test images only (default: all 10,000)")
    p.add_argument("--files-per-request", type=int, default=32, help="images per POST")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    test = load_fashion_mnist(DataConfig(data_dir=args.data_dir)).test
    test = test.head(args.limit or len(test))
    with httpx.Client(base_url=args.url, timeout=120) as client:
        figures = measure(client, test.images, test.labels, PRESETS["kwon"], args.files_per_request)
    given = sys.argv[1:] if argv is None else argv
    report = {"command": " ".join(["python -m training.http_check", *given]), **figures, "bars": bars(figures)}
    text = json.dumps(report, indent=2)
    log.info(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
