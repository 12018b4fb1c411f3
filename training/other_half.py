"""python -m training.other_half: the attack suite's bars on the other half of the test set.

`make evaluate` reports on test images 0 to 4,999; the design choices made with the attacks' true triggers are
made on images 5,000 to 9,999 (training.suite.SELECTION_START), but some earlier ones looked at the reported half
(reports/evaluation.md says which). This runs the same measurement (training.suite.run_suite: the same bundles,
thresholds and code) on the selection half and sets the two halves side by side, so that a figure that meets its
bar on one half and not on the other shows. Neither half is untouched by every choice: the table is a check of
how much the reported figures lean on the images they were measured on, not a fresh test set.

    python -m training.other_half [--images 5000] [--sent-images 1000]

writes reports/other_half.json and reports/other_half.md (after make evaluate: it reads reports/attack_suite.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from service.preprocess import to_model_input
from training.calibration import CalibrationConfig, split_calibration
from training.common import to_jsonable, write_report
from training.data import DataConfig, load_dataset
from training.suite import EVAL_ROOT, run_suite, selection

log = logging.getLogger(__name__)
BARS = ("tpr>=95%", "fpr<=2%", "asr_after<=2%", "clean_acc>=undefended-1pt", "as_sent_within_5pt")


def figures(attack: dict[str, Any]) -> dict[str, float]:
    """The figures each bar reads, of one attack of a suite report."""
    return {
        "tpr": attack["fused"]["tpr"],
        "fpr": attack["fused"]["fpr"],
        "attack_success_after": attack["attack_success_after"],
        "clean_accuracy_change": attack["clean_accuracy_guarded"] - attack["clean_accuracy"],
    }


def compare(reported: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Each attack's figures and bars on both halves, and where the halves disagree on a bar."""
    rows = {}
    bars = {half: {b["attack"]: b for b in suite["bars"]} for half, suite in (("reported", reported), ("other", other))}
    for name in other["attacks"]:
        row: dict[str, Any] = {
            "reported": figures(reported["attacks"][name]) if name in reported["attacks"] else None,
            "other": figures(other["attacks"][name]),
        }
        row["bars_differ"] = [
            bar for bar in BARS if name in bars["reported"] and bars["reported"][name][bar] != bars["other"][name][bar]
        ]
        rows[name] = row
    clean = {half: suite["clean_model"]["fpr"] for half, suite in (("reported", reported), ("other", other))}
    return {"attacks": rows, "clean_model_fpr": clean}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _points(x: float) -> str:
    return f"{100 * x:+.2f}"


def render(r: dict[str, Any]) -> str:
    lines = [
        "# The attack suite on the other half of the test set",
        "",
        f"Made by `{r['command']}` in {r['seconds'] / 60:.1f} min: the same bundles, thresholds and code as `make "
        f"evaluate`, on test images {r['first_image']} to {r['first_image'] + r['images'] - 1} (the half the "
        "design choices are made on), beside the figures `make evaluate` reports on images 0 to 4,999 "
        "(reports/attack_suite.json). Neither half is untouched by every choice (reports/evaluation.md says which "
        "choices looked at which): this shows how much the reported figures lean on their images. Each cell: "
        "reported half / other half.",
        "",
        "| attack | fused TPR | FPR | attacker's label after | clean accuracy change (points) | bars that differ |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in r["compare"]["attacks"].items():
        rep, oth = row["reported"], row["other"]
        if rep is None:
            continue
        cells = [f"{fmt(rep[key])} / {fmt(oth[key])}" for key, fmt in (
            ("tpr", _pct), ("fpr", _pct), ("attack_success_after", _pct), ("clean_accuracy_change", _points),
        )]  # fmt: skip
        lines.append(f"| {name} | {' | '.join(cells)} | {', '.join(row['bars_differ']) or 'none'} |")
    clean = r["compare"]["clean_model_fpr"]
    lines += ["", f"Clean model: fused FPR {_pct(clean['reported'])} / {_pct(clean['other'])}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, default=Path("models"), help="the shipped bundle")
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder")
    p.add_argument("--cache", type=Path, default=EVAL_ROOT, help="make evaluate's cache of suite models and guards")
    p.add_argument("--images", type=int, default=5000, help="test images from the selection half's start")
    p.add_argument("--sent-images", type=int, default=1000, help="test images per attack and as-sent variant")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    reported_path = args.out / "attack_suite.json"
    if not reported_path.is_file():
        sys.exit(f"{reported_path}: missing; run make evaluate first")
    start = time.perf_counter()
    ds = load_dataset(DataConfig(data_dir=args.data_dir))
    part = selection(args.images, len(ds.test.labels))
    x_cal = to_model_input(ds.calibration.images)
    _, _, half_b = split_calibration(len(x_cal), CalibrationConfig())
    other = run_suite(args.models, ds.test.images[part], ds.test.labels[part], args.sent_images, x_cal[half_b],
                      args.cache)  # fmt: skip
    report = {
        "first_image": part.start,
        "images": args.images,
        "suite": other,
        "compare": compare(json.loads(reported_path.read_text()), other),
    }
    command = " ".join(["python -m training.other_half", *(sys.argv[1:] if argv is None else argv)])
    write_report(to_jsonable(report), command, start, args.out, "other_half", render)


if __name__ == "__main__":
    main()
