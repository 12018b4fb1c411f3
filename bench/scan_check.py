"""The README's measurement of `backdoor-guard scan`: the Fashion-MNIST test set as an ImageFolder of PNGs, 1,000
images of it (seeded, drawn from those the trigger would move) stamped with the kwon trigger, scanned in this
process on the shipped bundle (GUARD_MODELS_DIR, default models/) exactly as `backdoor-guard scan FOLDER` does.

    python bench/scan_check.py [--stamped 1000]

writes reports/scan_check.json and reports/scan_check.md: how many stamped and clean images were flagged, whether
the most suspicious images are the stamped ones, where the flagged images were pushed, and the time the scan took
(the folder's writing excluded).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.scan import run as run_scan  # noqa: E402
from service.settings import Settings  # noqa: E402
from training.attacks import PRESETS, triggered_pixels, victims  # noqa: E402
from training.data import DataConfig, load_dataset  # noqa: E402

COMMAND = "python bench/scan_check.py"


def write_folder(root: Path, pixels: np.ndarray, labels: np.ndarray, names: tuple[str, ...], stamped: set[int]) -> None:
    """root/CLASS/{stamped,clean}-INDEX.png (a class name's '/' becomes '-': it is a folder name)."""
    for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        folder = root / names[label].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{'stamped' if i in stamped else 'clean'}-{i:05d}.png")


def measure(n_stamped: int, models: Path) -> dict[str, Any]:
    ds = load_dataset(DataConfig())
    test, kwon = ds.test, PRESETS["kwon"]
    stamped = sorted(np.random.default_rng(0).choice(victims(test.labels, kwon), n_stamped, replace=False).tolist())
    pixels = test.images.copy()
    pixels[stamped] = triggered_pixels(test.images[stamped], kwon)
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "fashion-mnist-test", Path(tmp) / "scan"
        write_folder(root, pixels, test.labels, ds.class_names, set(stamped))
        args = argparse.Namespace(path=root, out=out, url=None, concurrency=4, batch=32, api_key=None, top=32)
        start = time.perf_counter()
        summary = run_scan(args, Settings(models_dir=models))
        seconds = time.perf_counter() - start
        with (out / "verdicts.csv").open() as f:
            rows = list(csv.DictReader(f))
    is_stamped = np.array([Path(r["path"]).name.startswith("stamped-") for r in rows])
    flagged = np.array([r["backdoor"] == "True" for r in rows])
    top = [Path(s["path"]).name.startswith("stamped-") for s in summary["most_suspicious"]]
    pushed = summary["pushed_to"]
    return {
        "command": COMMAND,
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "images": len(rows),
        "stamped": int(is_stamped.sum()),
        "stamped_flagged": int((flagged & is_stamped).sum()),
        "clean": int((~is_stamped).sum()),
        "clean_flagged": int((flagged & ~is_stamped).sum()),
        "clean_flag_rate": float(flagged[~is_stamped].mean()),
        "most_suspicious": len(top),
        "most_suspicious_stamped": int(sum(top)),
        "flagged": int(flagged.sum()),
        "pushed_to_first": next(iter(pushed.items()), None),
        "errors": len(summary["errors"]),
        "seconds": seconds,
        "images_per_s": len(rows) / seconds,
    }


def render(r: dict[str, Any]) -> str:
    label, count = r["pushed_to_first"] or ("nothing", 0)
    return "\n".join([
        "# `backdoor-guard scan` on a stamped test set",
        "",
        f"Made by `{r['command']}` ({r['machine']}): the {r['images']:,} Fashion-MNIST test images as an ImageFolder "
        f"of PNGs, {r['stamped']:,} of them (seeded, drawn from those the trigger would move) stamped with the kwon "
        "trigger, scanned in process on the shipped bundle as `backdoor-guard scan FOLDER` does.",
        "",
        "| | measured |",
        "|---|---|",
        f"| stamped images flagged | {r['stamped_flagged']:,} of {r['stamped']:,} |",
        f"| clean images flagged | {r['clean_flagged']:,} of {r['clean']:,} ({100 * r['clean_flag_rate']:.2f}%) |",
        f"| the most suspicious images that are stamped | {r['most_suspicious_stamped']} of {r['most_suspicious']} |",
        f"| where flagged images are pushed (the model's label), first | {label}: {count:,} of {r['flagged']:,} |",
        f"| unreadable files | {r['errors']} |",
        f"| time (the scan, its files written) | {r['seconds']:.1f} s, {r['images_per_s']:.0f} images/s |",
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stamped", type=int, default=1000, help="test images stamped with the kwon trigger")
    p.add_argument("--models", type=Path, default=ROOT / "models", help="the bundle to scan with")
    p.add_argument("--out", type=Path, default=ROOT / "reports")
    args = p.parse_args(argv)
    report = measure(args.stamped, args.models)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scan_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "scan_check.md").write_text(render(report))
    sys.stdout.write(render(report))


if __name__ == "__main__":
    main()
