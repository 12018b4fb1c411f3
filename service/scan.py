"""`backdoor-guard scan PATH`: the guard over a whole dataset, the audit a team runs before training on data it did
not make (a poisoned training set is the premise of the ABL seed).

PATH is a folder tree of images (an ImageFolder `root/CLASS/*.png` gives each image its class; `root/train/CLASS`
too) or an `.npz` (`x` uint8 NHW, NHWC or NCHW, optional `y` and `class_names`). The guard runs in this process on
a bundle (GUARD_MODELS_DIR), or against a running service with `--url` and `--concurrency` (a cluster of replicas
behind one address scans a large set). It writes to `--out`:

- `verdicts.csv`: one row per image: where it is, its given class, the label to trust, the verdict, the fused score,
  the model's own label (what a trigger pushes to), the restored and repaired labels, and each signal's score and
  verdict; a file that cannot be read is a row with its error, never a silent clean;
- `summary.json` and `summary.md`: the flag rate overall, per given class and per folder, the labels flagged images
  are pushed to, the errors;
- `suspicious.png`: the most suspicious images (highest fused score), with their score and the model's label.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from service.decode import IMAGE_SUFFIXES, decode
from service.errors import GuardError
from service.preprocess import Preprocessing, nhwc, to_model_input
from service.settings import Settings

if TYPE_CHECKING:
    from service.bundle import Bundle
    from service.guard import GuardPipeline

MAX_PIXELS = 1 << 28  # a dataset's images may be large; the service's own limit is for uploads
CHUNK = 256  # images per in-process guard call


@dataclass(frozen=True)
class Item:
    """One image of the dataset: where it is, its given class (ImageFolder or npz label), how to get its bytes."""

    path: str
    folder: str
    given: str | None
    read: Callable[[], bytes] = field(repr=False, compare=False)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def collect(path: Path) -> tuple[list[Item], list[str]]:
    """The images under `path` (sorted), and the files skipped because their names are not image formats."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
        if "x" not in data:
            raise ValueError(f"{path}: needs an array x (images), has {sorted(data)}")
        x = nhwc(data["x"], f"{path}:x")
        x = x[..., 0] if x.shape[-1] == 1 else x  # as Pillow takes gray
        y = data.get("y")
        names = [str(n) for n in data["class_names"]] if "class_names" in data else None

        def given(i: int) -> str | None:
            if y is None:
                return None
            return names[int(y[i])] if names is not None and 0 <= int(y[i]) < len(names) else str(int(y[i]))

        items = [Item(f"{path.name}[{i}]", "", given(i), partial(_png, x[i])) for i in range(len(x))]
        return items, []
    if not path.is_dir():
        raise ValueError(f"{path}: expected a folder of images or an .npz")
    items, skipped = [], []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(str(rel))
            continue
        folder = str(rel.parent) if rel.parent != Path(".") else ""
        items.append(Item(str(rel), folder, rel.parent.name or None, f.read_bytes))
    return items, skipped


# ---- the two ways to run the guard ----------------------------------------------------------------------------
Row = dict[str, Any]


def _error_row(item: Item, message: str) -> Row:
    return {"path": item.path, "folder": item.folder, "given_class": item.given, "error": message}


def local_guard(settings: Settings) -> tuple[Bundle, GuardPipeline]:
    """The bundle and the guard the service would run with these settings."""
    from service.bundle import Bundle
    from service.guard import PlainPipeline
    from service.runtime import pipeline_for
    from service.selftest import SelfTestFailed, self_test

    bundle = Bundle.load(settings.models_dir, settings.ort_threads, settings.prefer_gpu, settings.bundle_sha256)
    guard = pipeline_for(settings, bundle)
    if isinstance(guard, PlainPipeline):
        raise SystemExit("scan needs the guard on: unset GUARD_SIGNALS=none")
    try:  # the service's start-up self-test (service.selftest)
        self_test(bundle, lambda images: guard.run_in_chunks(images, CHUNK)).check()
    except SelfTestFailed as err:
        raise SystemExit(f"backdoor-guard scan: {err}") from None
    return bundle, guard


def scan_local(items: list[Item], bundle: Bundle, guard: GuardPipeline) -> Iterator[Row]:
    """The guard in this process; one row per item, in order."""
    classes, contract = bundle.class_names, bundle.preprocessing
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        pixels, good, errors = [], [], {}
        for i, item in enumerate(chunk):
            try:
                pixels.append(decode(item.read(), start + i, item.path, contract, MAX_PIXELS))
                good.append(i)
            except (GuardError, OSError) as err:
                errors[i] = getattr(err, "message", str(err))
        rows: dict[int, Row] = {i: _error_row(chunk[i], m) for i, m in errors.items()}
        if good:
            result = guard.run(to_model_input(np.stack(pixels), contract))
            for j, i in enumerate(good):
                rows[i] = _row(chunk[i], result, j, classes)
        yield from (rows[i] for i in range(len(chunk)))


def _row(item: Item, result: Any, j: int, classes: list[str]) -> Row:
    """One image's row from a GuardResult (the in-process guard)."""
    backdoor = bool(result.backdoor[j])
    row: Row = {
        "path": item.path, "folder": item.folder, "given_class": item.given,
        "label": int(result.labels[j]), "class_name": classes[int(result.labels[j])],
        "backdoor": backdoor, "score": float(result.score[j]),
        "original_label": int(result.original.labels[j]), "original_class": classes[int(result.original.labels[j])],
        "restored_label": int(result.restored.labels[j]),
        "repaired_label": None if result.repaired is None else int(result.repaired.labels[j]),
        "label_source": result.source if backdoor else "original", "error": None,
    }  # fmt: skip
    for name, signal in result.signals.items():
        row[f"{name}_score"] = float(signal.score[j])
        row[f"{name}_triggered"] = bool(signal.triggered[j])
    return row


def _post(url: str, files: list[tuple[str, bytes]], api_key: str | None, timeout: float) -> list[dict[str, Any]]:
    from service.demo_client import encode_files

    body, content_type = encode_files(files)
    headers = {"Content-Type": content_type, **({"X-API-Key": api_key} if api_key else {})}
    request = urllib.request.Request(f"{url}/classify", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())["results"]


def _remote_rows(url: str, chunk: list[Item], api_key: str | None, timeout: float, retries: int = 20) -> list[Row]:
    """One request for a chunk; a file the service refuses (400, 413) is isolated by sending the chunk one by one;
    a busy service (503) is retried after its Retry-After."""
    for _ in range(retries):
        try:
            results = _post(url, [(item.path, item.read()) for item in chunk], api_key, timeout)
            return [_remote_row(item, r) for item, r in zip(chunk, results, strict=True)]
        except urllib.error.HTTPError as err:
            if err.code == 503:
                time.sleep(float(err.headers.get("Retry-After") or 1))
                continue
            refused = err.code in (400, 413)  # a file it cannot read, or one over its limits
            if refused and len(chunk) > 1:
                return [row for item in chunk for row in _remote_rows(url, [item], api_key, timeout, retries)]
            message = json.loads(err.read() or b"{}").get("error", {}).get("message", str(err))
            if refused:
                return [_error_row(chunk[0], message)]
            raise RuntimeError(f"{url}/classify answered {err.code}: {message}") from None
    raise RuntimeError(f"{url}/classify stayed busy (503) for {retries} tries")


def _remote_row(item: Item, r: dict[str, Any]) -> Row:
    row: Row = {
        "path": item.path, "folder": item.folder, "given_class": item.given,
        "label": r["label"], "class_name": r["class_name"], "backdoor": r["backdoor"], "score": r["score"],
        "original_label": r["original"]["label"], "original_class": r["original"]["class_name"],
        "restored_label": (r["restored"] or {}).get("label"), "repaired_label": (r["repaired"] or {}).get("label"),
        "label_source": r["label_source"], "error": None,
    }  # fmt: skip
    return row


def scan_remote(
    items: list[Item], url: str, concurrency: int, batch: int, api_key: str | None, timeout: float = 120.0
) -> Iterator[Row]:
    """The guard of a running service (/classify), `concurrency` requests of `batch` files at a time, in order.
    Per-signal scores are not in the rows here: /classify reports evidence, not the fused inputs."""
    url = url.rstrip("/")
    chunks = [items[i : i + batch] for i in range(0, len(items), batch)]
    with ThreadPoolExecutor(concurrency) as pool:
        for rows in pool.map(lambda c: _remote_rows(url, c, api_key, timeout), chunks):
            yield from rows


def remote_contract(url: str, api_key: str | None) -> tuple[Preprocessing, str]:
    """The running service's preprocessing contract and model name (for the grid of suspicious images)."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/v2", timeout=30) as response:
        name = json.loads(response.read())["models"][0]
    with urllib.request.urlopen(f"{url.rstrip('/')}/v2/models/{name}", timeout=30) as response:
        return Preprocessing(**json.loads(response.read())["preprocessing"]), name


# ---- the summary ----------------------------------------------------------------------------------------------
def summarize(rows: list[Row], skipped: list[str], top: int) -> dict[str, Any]:
    judged = [r for r in rows if r["error"] is None]
    flagged = [r for r in judged if r["backdoor"]]

    def rates(key: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in judged:
            entry = out.setdefault(str(r[key]), {"images": 0, "flagged": 0})
            entry["images"] += 1
            entry["flagged"] += int(r["backdoor"])
        for entry in out.values():
            entry["flag_rate"] = entry["flagged"] / entry["images"]
        return dict(sorted(out.items()))

    pushed = Counter(r["original_class"] for r in flagged)
    # flagged images the model gives a label other than their given class: what a trigger pushed them to
    moved = Counter(
        r["original_class"] for r in flagged if r["given_class"] and r["original_class"] != r["given_class"]
    )
    suspicious = sorted(judged, key=lambda r: -r["score"])[:top]
    return {
        "images": len(rows),
        "judged": len(judged),
        "flagged": len(flagged),
        "flag_rate": len(flagged) / len(judged) if judged else float("nan"),
        "errors": [{"path": r["path"], "error": r["error"]} for r in rows if r["error"] is not None],
        "skipped_files": skipped,
        "per_class": rates("given_class") if any(r["given_class"] for r in judged) else {},
        "per_folder": rates("folder"),
        "pushed_to": dict(pushed.most_common()),
        "pushed_away_from_given_class": dict(moved.most_common()),
        "most_suspicious": [
            {"path": r["path"], "score": r["score"], "model_says": r["original_class"]} for r in suspicious
        ],
    }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def render(summary: dict[str, Any], command: str) -> str:
    lines = [
        "# Scan",
        "",
        f"`{command}`: {summary['images']} images, {summary['judged']} judged, {summary['flagged']} flagged "
        f"({_pct(summary['flag_rate'])}), {len(summary['errors'])} unreadable, "
        f"{len(summary['skipped_files'])} other files skipped.",
        "",
    ]
    for title, key in (("Per given class", "per_class"), ("Per folder", "per_folder")):
        same = key == "per_folder" and (list(summary[key]) == [""] or summary[key] == summary["per_class"])
        if summary[key] and not same:  # a folder per class: the class table says it all
            lines += [f"## {title}", "", "| | images | flagged | flag rate |", "|---|---|---|---|"]
            lines += [f"| {k or '.'} | {v['images']} | {v['flagged']} | {_pct(v['flag_rate'])} |"
                      for k, v in summary[key].items()]  # fmt: skip
            lines.append("")
    lines += ["## Where flagged images are pushed (the model's own label)", ""]
    lines += [f"- {k}: {v}" for k, v in summary["pushed_to"].items()] or ["- nothing flagged"]
    if summary["pushed_away_from_given_class"]:
        lines += ["", "Of them, away from their given class: "
                  + ", ".join(f"{k} {v}" for k, v in summary["pushed_away_from_given_class"].items())]  # fmt: skip
    lines += ["", "## The most suspicious images", "", "![most suspicious](suspicious.png)", ""]
    lines += [f"{i + 1}. `{s['path']}`: score {s['score']:.6f}, the model says {s['model_says']}"
              for i, s in enumerate(summary["most_suspicious"])]  # fmt: skip
    if summary["errors"]:
        lines += ["", "## Unreadable files (no verdict: an error, never clean)", ""]
        lines += [f"- `{e['path']}`: {e['error']}" for e in summary["errors"]]
    return "\n".join(lines) + "\n"


def write_grid(path: Path, items: dict[str, Item], picks: list[dict[str, Any]], contract: Preprocessing) -> None:
    """The most suspicious images as the model sees them, 3x, captioned with their score and the model's label."""
    if not picks:
        Image.new("RGB", (1, 1), "white").save(path)
        return
    scale, cols = max(1, 96 // max(contract.height, contract.width)), 8
    cell_w, cell_h = contract.width * scale + 8, contract.height * scale + 30
    rows = -(-len(picks) // cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, pick in enumerate(picks):
        item = items[pick["path"]]
        pixels = decode(item.read(), k, item.path, contract, MAX_PIXELS)
        tile = (
            Image.fromarray(pixels)
            .convert("RGB")
            .resize((contract.width * scale, contract.height * scale), Image.Resampling.NEAREST)
        )
        x, y = (k % cols) * cell_w + 4, (k // cols) * cell_h + 2
        sheet.paste(tile, (x, y))
        draw.text((x, y + contract.height * scale + 1), f"{pick['score']:.4f}", fill="black")
        draw.text((x, y + contract.height * scale + 13), str(pick["model_says"])[:14], fill="red")
    sheet.save(path)


def write_csv(path: Path, rows: list[Row]) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in columns})


class Progress:
    """A one-line progress bar on stderr (when it is a terminal, or always with GUARD_PROGRESS=1)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.flagged, self.enabled = total, 0, 0, enabled
        self.start = time.perf_counter()

    def update(self, row: Row) -> None:
        self.done += 1
        self.flagged += int(bool(row.get("backdoor")))
        if self.enabled and (self.done % 64 == 0 or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            bar = "#" * int(30 * self.done / max(self.total, 1))
            sys.stderr.write(f"\rscan [{bar:<30}] {self.done}/{self.total} images, {self.flagged} flagged, "
                             f"{rate:.0f} images/s")  # fmt: skip
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a folder tree of images (ImageFolder: root/CLASS/*.png) or an .npz")
    p.add_argument("--out", type=Path, default=Path("scan"), help="where to write verdicts.csv, summary.*, "
                   "suspicious.png (default ./scan)")  # fmt: skip
    p.add_argument("--url", default=None, help="scan through a running guard (e.g. http://guard:8000) instead of "
                   "in this process on GUARD_MODELS_DIR")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=4, help="with --url: requests in flight (default 4)")
    p.add_argument("--batch", type=int, default=32, help="with --url: images per request (default 32)")
    p.add_argument("--api-key", default=None, help="with --url: the service's X-API-Key (default $GUARD_API_KEY)")
    p.add_argument("--top", type=int, default=32, help="images in suspicious.png (default 32)")


def run(args: argparse.Namespace, settings: Settings | None = None) -> dict[str, Any]:
    """Scan, write the files, return the summary. settings: the in-process guard's (not needed with --url)."""
    items, skipped = collect(args.path)
    if not items:
        raise SystemExit(f"{args.path}: no images ({', '.join(IMAGE_SUFFIXES)}) to scan")
    if args.concurrency < 1 or args.batch < 1:
        raise SystemExit("--concurrency and --batch must be at least 1")
    progress = Progress(len(items), sys.stderr.isatty() or os.environ.get("GUARD_PROGRESS") == "1")
    if args.url:
        key = args.api_key or os.environ.get("GUARD_API_KEY")
        contract, _ = remote_contract(args.url, key)
        stream = scan_remote(items, args.url, args.concurrency, args.batch, key)
    else:
        if settings is None:
            raise ValueError("an in-process scan needs the service's settings (GUARD_MODELS_DIR)")
        bundle, guard = local_guard(settings)
        contract = bundle.preprocessing
        stream = scan_local(items, bundle, guard)
    rows = []
    for row in stream:
        progress.update(row)
        rows.append(row)
    summary = summarize(rows, skipped, args.top)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "verdicts.csv", rows)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    command = " ".join(["backdoor-guard scan", *sys.argv[2:]]) if sys.argv[1:2] == ["scan"] else "backdoor-guard scan"
    (args.out / "summary.md").write_text(render(summary, command))
    write_grid(args.out / "suspicious.png", {i.path: i for i in items}, summary["most_suspicious"], contract)
    return summary
