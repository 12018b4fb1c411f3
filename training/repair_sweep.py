"""Which clean-data repair: candidate recipes side by side on every suite model (`make repair-sweep`).

The issue asks that the repaired model keep its clean accuracy within 1 point of the original's while the backdoor
goes. With the few hundred clean images per class a defender holds (the calibration split's repair share), the two
pull against each other: the fine-tuning that makes a model forget its backdoor also makes it forget some of what it
knew. This command measures that trade for each candidate RepairConfig, from the same cached classifiers and Neural
Cleanse results the suite uses (training.suite; the shipped model for `kwon`), on the suite's test images: clean
accuracy against the original's, the attack's success on the repaired model and how many triggered images it gives
their true label. It measures the repaired model alone; what the guard makes of it (the repaired signal, the label
source) is `make evaluate`'s, for the recipe the bundles are built with.

    python -m training.repair_sweep [--images 5000] [--attacks kwon,wanet] [--adversarial]

writes reports/repair.json and reports/repair.md.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.bundle import read_manifest
from service.preprocess import to_model_input
from training.attacks import attack_labels, triggered_pixels, victims
from training.calibration import CalibrationConfig
from training.common import predict, table_head, to_jsonable, write_report
from training.metrics import rate
from training.pipeline import Builder
from training.repair import RepairConfig
from training.suite import SELECTION_START, SUITE, config_of, selection, train, which_test_images

log = logging.getLogger(__name__)
BAR = 0.01  # the issue's: the repaired model's clean accuracy >= the original's - 1 point
# The default: prune, then unlearn Neural Cleanse's triggers, fine-tuning every layer.
BEFORE = RepairConfig()
# Earlier sweeps also weighed lr 2e-4 for 15 passes, lr 1e-3, mixup 0.2, no pruning, no unlearning and adversarial
# unlearning (reports/repair.md at commit 47152fd): none kept accuracy within the bar on more models than
# distillation alone.
CANDIDATES: dict[str, RepairConfig] = {
    "prune and unlearn (the default)": BEFORE,
    "fine-tuning alone": replace(BEFORE, prune=False, unlearn_share=0.0),
    "distillation 0.5": replace(BEFORE, distill=0.5),
    "last 3 layers": replace(BEFORE, tune_layers=3),
    "last 3 layers, distillation 0.5": replace(BEFORE, tune_layers=3, distill=0.5),
    "last 2 layers, distillation 0.5": replace(BEFORE, tune_layers=2, distill=0.5),
}
ADVERSARIAL = {"adversarial unlearning": replace(BEFORE, adversarial=True)}  # about 5x the time: --adversarial


def entry_builder(name: str, models: Path) -> tuple[Builder, Path, Path]:
    """The builder of suite entry `name` with its classifier and Neural Cleanse result: for kwon the shipped
    bundle's checkpoints (its manifest's `checkpoints`), for the others the suite's cache (trained if missing)."""
    if name == "kwon":
        manifest = read_manifest(models)
        ck, calibration = manifest["checkpoints"], CalibrationConfig(**manifest["configs"]["calibration"])
        builder = Builder(replace(config_of(name), calibration=calibration), models, models / "checkpoints")
        return builder, models / ck["classifier"]["path"], models / ck["reversed_triggers"]["path"]
    builder = train(name, stages=("classifier", "neural-cleanse"))
    return builder, builder.classifier_path, builder.work / "neural_cleanse.npz"


def measure(model: torch.nn.Module, clean: np.ndarray, labels: np.ndarray, triggered: np.ndarray,
            true: np.ndarray, wanted: np.ndarray | None) -> dict[str, float]:  # fmt: skip
    """Clean accuracy; on the triggered images, attack success and the true label's rate."""
    on_clean, on_triggered = predict(model, clean)[0].argmax(1), predict(model, triggered)[0].argmax(1)
    out = {"clean_accuracy": rate(on_clean == labels), "triggered_true_label": rate(on_triggered == true)}
    if wanted is not None:
        out["attack_success"] = rate(on_triggered == wanted)
    return out


def sweep_entry(name: str, candidates: dict[str, RepairConfig], models: Path, n_images: int) -> dict[str, Any]:
    builder, classifier, reversed_triggers = entry_builder(name, models)
    ds, attack = builder.dataset, builder.config.attack_config
    part = selection(n_images, len(ds.test.labels))  # not the images make evaluate reports on
    images, labels = ds.test.images[part], ds.test.labels[part]
    idx = victims(labels, attack)
    triggered = to_model_input(triggered_pixels(images[idx], attack, builder.contract), builder.contract)
    wanted = attack_labels(labels[idx], attack, builder.num_classes) if attack.poison_rate > 0 else None
    clean = builder.x_test[part]
    args = (clean, labels, triggered, labels[idx], wanted)
    out: dict[str, Any] = {"arch": SUITE[name].arch, "original": measure(builder.load_classifier(classifier), *args)}
    for label, config in candidates.items():
        start = time.perf_counter()
        model, facts = builder.repaired(config, classifier, reversed_triggers)
        row = measure(model, *args) | {"seconds": time.perf_counter() - start, "pruned_share": facts["pruned_share"]}
        row["accuracy_change"] = row["clean_accuracy"] - out["original"]["clean_accuracy"]
        out[label] = row
        log.info("%s, %s: %s", name, label, {k: round(v, 4) for k, v in row.items()})
    return out


def summarise(entries: dict[str, dict[str, Any]], candidates: list[str]) -> dict[str, dict[str, Any]]:
    """Per candidate: on how many models the accuracy bar holds, the worst accuracy change and attack success."""
    rows = {}
    for c in candidates:
        changes = [e[c]["accuracy_change"] for e in entries.values()]
        success = [e[c]["attack_success"] for e in entries.values() if "attack_success" in e[c]]
        rows[c] = {
            "within_bar": sum(ch >= -BAR for ch in changes),
            "models": len(changes),
            "worst_accuracy_change": min(changes),
            "mean_accuracy_change": float(np.mean(changes)),
            "worst_attack_success": max(success, default=float("nan")),
            "mean_attack_success": float(np.mean(success)) if success else float("nan"),
            "seconds": sum(e[c]["seconds"] for e in entries.values()),
        }
    return rows


def run(models: Path, n_images: int, names: list[str], adversarial: bool) -> dict[str, Any]:
    candidates = {**CANDIDATES, **(ADVERSARIAL if adversarial else {})}
    entries = {name: sweep_entry(name, candidates, models, n_images) for name in names}
    return {
        "images": n_images,
        "first_image": SELECTION_START,
        "candidates": {k: to_jsonable(v) for k, v in candidates.items()},
        "attacks": entries,
        "summary": summarise(entries, list(candidates)),
    }


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def render(r: dict[str, Any]) -> str:
    names, candidates = list(r["attacks"]), list(r["candidates"])
    default = to_jsonable(RepairConfig())
    lines = [
        "# Which repair: candidate recipes on every suite model",
        "",
        f"Made by `{r['command']}` ({r['seconds'] / 60:.1f} min). Each candidate repairs the suite's cached model "
        "(the shipped one for kwon) from the calibration split's repair share only, with Neural Cleanse's reversed "
        f"triggers; measured on {which_test_images(r)} and their triggered victims. A candidate "
        "differs from the default RepairConfig (training/repair.py) only in:",
        "",
    ]
    for c in candidates:
        diff = {k: v for k, v in r["candidates"][c].items() if default.get(k) != v}
        lines.append(f"- {c}: " + (", ".join(f"`{k}={v}`" for k, v in diff.items()) or "the default"))
    lines += [
        "",
        "## Summary",
        "",
        f"| candidate | accuracy within {100 * BAR:.0f} point | worst / mean accuracy change | worst / mean attack "
        "success on the repaired model | seconds (all models) |",
        "|---|---|---|---|---|",
    ]
    for c, s in r["summary"].items():
        lines.append(
            f"| {c} | {s['within_bar']} of {s['models']} | {100 * s['worst_accuracy_change']:+.2f} / "
            f"{100 * s['mean_accuracy_change']:+.2f} | {_pct(s['worst_attack_success'])} / "
            f"{_pct(s['mean_attack_success'])} | {s['seconds']:.0f} |"
        )
    lines += [
        "",
        "## Per model: clean accuracy change / attack success / triggered images given their true label",
        "",
        *table_head("attack (arch): original accuracy, attack success", candidates),
    ]
    for name in names:
        e, o = r["attacks"][name], r["attacks"][name]["original"]
        head = f"{name} ({e['arch']}): {_pct(o['clean_accuracy'])}, " + (
            _pct(o["attack_success"]) if "attack_success" in o else "no attack"
        )
        cells = [
            f"{100 * e[c]['accuracy_change']:+.2f} / "
            + (_pct(e[c]["attack_success"]) if "attack_success" in e[c] else "-")
            + f" / {_pct(e[c]['triggered_true_label'])}"
            for c in candidates
        ]
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.repair_sweep", description=__doc__.splitlines()[0])
    p.add_argument(
        "--images",
        type=int,
        default=5000,
        help="test images per attack, from test image 5000 on (training.suite.SELECTION_START)",
    )
    p.add_argument("--attacks", default=",".join(SUITE), help="comma-separated suite entries (default: all)")
    p.add_argument("--adversarial", action="store_true", help="also weigh adversarial unlearning (about 5x slower)")
    p.add_argument("--models", type=Path, default=Path("models"), help="the shipped bundle (the kwon entry)")
    p.add_argument("--out", type=Path, default=Path("reports"))
    args = p.parse_args(argv)
    names = [n for n in args.attacks.split(",") if n]
    unknown = sorted(set(names) - SUITE.keys())
    if unknown:
        p.error(f"unknown suite entries {unknown}; choose from {sorted(SUITE)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    report = run(args.models, args.images, names, args.adversarial)
    command = " ".join(["python -m training.repair_sweep", *(sys.argv[1:] if argv is None else argv)])
    write_report(report, command, start, args.out, "repair", render)


if __name__ == "__main__":
    main()
