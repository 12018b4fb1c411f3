"""python -m training.choices: early design choices made again on the selection half of the test set.

Some choices were made while the suite reported on the first 5,000 test images, looking at them
(reports/evaluation.md says which). This re-makes those that a refit of the fusion can re-make, on the
selection half (test images from training.suite.SELECTION_START on), and fuses each candidate exactly as
`make cost` does: tables from calibration half A, the threshold from half B, one rule for every attack. The
candidates are:
- the fusion rule: Fisher's sum of clean-tail surprises (the default), or the largest percentile;
- the repaired signal's score: the Jeffreys divergence (the default), or the drop in the original label's
  probability;
- the signals: the default set, with squeeze or the masked AE added, or without mahalanobis.

For each candidate it reports the fused TPR and FPR per suite attack, and the worst change against the default
over the attacks. It chooses nothing by itself.

    python -m training.choices [--images 5000]

writes reports/choices.json and reports/choices.md (after make evaluate, which builds the suite's bundles).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle import Bundle, build_pipeline
from service.guard import GuardResult
from training.common import to_jsonable, write_report
from training.cost import fused_rates, rates_cell, selection_sets
from training.suite import SELECTION_START, which_test_images

log = logging.getLogger(__name__)
EXTRA = ("squeeze", "masked_ae")  # signals the default set left, weighed again here
DROP = "repaired_drop"  # the repaired signal's other score (its evidence "drop"), as a signal of its own


def scores(bundle: Bundle, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every candidate signal's raw score on `images`: the bundle's, EXTRA, and the repaired model's drop."""
    guard = build_pipeline(bundle, calibrated=False, signals=[*bundle.signal_names, *EXTRA])
    result = GuardResult.concat(guard.run_chunked(images))
    out = {name: r.score for name, r in result.signals.items()}
    out[DROP] = result.signals["repaired"].evidence["drop"]
    return out


def candidates(signals: list[str], rule: str) -> dict[str, tuple[list[str], str]]:
    """Candidate name -> (signals, fusion rule); the first is the default."""
    other_rule = "max" if rule == "fisher" else "fisher"
    return {
        "default": (signals, rule),
        f"rule {other_rule}": (signals, other_rule),
        "repaired scored by the drop": ([DROP if s == "repaired" else s for s in signals], rule),
        **{f"+ {extra}": ([*signals, extra], rule) for extra in EXTRA},
        "- mahalanobis": ([s for s in signals if s != "mahalanobis"], rule),
    }


def run(shipped: Path, n_images: int) -> dict[str, Any]:
    attacks: dict[str, dict[str, dict[str, float]]] = {}
    for sel in selection_sets(shipped, n_images):
        start = time.perf_counter()
        sets = {"a": scores(sel.bundle, sel.half_a), "b": scores(sel.bundle, sel.half_b),
                "clean": scores(sel.bundle, sel.clean), "triggered": scores(sel.bundle, sel.triggered)}  # fmt: skip
        log.info("%s: scores in %.0f s", sel.name, time.perf_counter() - start)
        rule = sel.bundle.manifest["thresholds"]["fused"].get("rule", "max")
        fpr = float(sel.bundle.manifest["thresholds"]["target_fpr"])
        attacks[sel.name] = {
            c: fused_rates(sets, keep, r, fpr) for c, (keep, r) in candidates(sel.bundle.signal_names, rule).items()
        }
    rows = {}
    for c in next(iter(attacks.values())):
        tpr = {a: attacks[a][c]["tpr"] - attacks[a]["default"]["tpr"] for a in attacks}
        fpr_change = {a: attacks[a][c]["fpr"] - attacks[a]["default"]["fpr"] for a in attacks}
        rows[c] = {
            "worst_tpr_change": min(tpr.values()), "worst_tpr_attack": min(tpr, key=tpr.__getitem__),
            "best_tpr_change": max(tpr.values()), "worst_fpr_change": max(fpr_change.values()),
        }  # fmt: skip
    return {"images": n_images, "first_image": SELECTION_START, "attacks": attacks, "candidates": rows}


def render(r: dict[str, Any]) -> str:
    names = list(r["attacks"])
    head = f"| candidate | {' | '.join(names)} | worst TPR change | best TPR change | worst FPR change |"
    lines = [
        "# Early design choices, made again on the selection half",
        "",
        f"Made by `{r['command']}` in {r['seconds'] / 60:.1f} min, on {which_test_images(r)}: each candidate "
        "fused as `make cost` fuses (tables from calibration half A, threshold from half B, one rule for every "
        "attack). Each cell: fused TPR / FPR (%); the changes are against the default, in points.",
        "",
        head,
        "|---" * (len(names) + 4) + "|",
    ]
    for c, row in r["candidates"].items():
        cells = " | ".join(rates_cell(r["attacks"][a][c]) for a in names)
        worst = f"{100 * row['worst_tpr_change']:+.2f} ({row['worst_tpr_attack']})"
        lines.append(f"| {c} | {cells} | {worst} | {100 * row['best_tpr_change']:+.2f} | "
                     f"{100 * row['worst_fpr_change']:+.2f} |")  # fmt: skip
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, default=Path("models"), help="the shipped bundle")
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--images", type=int, default=5000, help="test images from the selection half's start")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    report = run(args.models, args.images)
    command = " ".join(["python -m training.choices", *(sys.argv[1:] if argv is None else argv)])
    write_report(to_jsonable(report), command, start, args.out, "choices", render)


if __name__ == "__main__":
    main()
