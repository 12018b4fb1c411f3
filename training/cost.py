"""Detection per cost: which signals and which STRIP N a bundle runs by default (`make cost`).

For every suite bundle (training.suite; built and calibrated by `make evaluate`), the guard's raw signal
scores are computed once per STRIP N on the calibration halves and on test images (clean, and triggered
with the entry's attack). Each candidate configuration (a STRIP N, a set of signals) is then fused exactly
as calibration fuses the bundle (service.guard.Fusion with the bundle's rule: tables from half A, threshold
at the (1 - target FPR) quantile of half B), and its fused TPR and FPR are measured on the test images.
A configuration qualifies when no attack loses more than `slack` of fused TPR or gains more than `slack`
of FPR against the full one; the cheapest that qualifies (classifier passes per image) is the choice.
No threshold is set per attack and the attacker's trigger only measures. It also weighs each label source a
flagged image can take its label from (`label_sources`) under every bundle's own verdicts. The test images are
the half the attack suite does not report on (training.suite.SELECTION_START).

    python -m training.cost [--images 5000] [--slack 0.005]

writes reports/cost.json and reports/cost.md.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle import Bundle, build_pipeline
from service.preprocess import to_model_input
from training.attacks import PRESETS, AttackConfig, attack_labels, triggered_pixels, victims
from training.calibration import CalibrationConfig, collect, fit_fusion, split_calibration
from training.common import write_report
from training.data import DataConfig, load_dataset
from training.metrics import rate
from training.suite import SELECTION_START, SUITE, selection, suite_bundle, which_test_images

log = logging.getLogger(__name__)
STRIP_NS = (32, 16, 8, 4)
# Weighed beside each bundle's own signals: the full set the cheaper ones are held to includes STRIP, which left
# the default when this comparison found the set without it within the slack (training/pipeline.py SIGNALS).
WEIGHED = ("strip",)
Scores = dict[str, np.ndarray]  # signal -> raw scores


def full_set(bundle: Bundle) -> list[str]:
    """The bundle's signals and those WEIGHED beside them."""
    return [*bundle.signal_names, *(s for s in WEIGHED if s not in bundle.signal_names)]


def raw_scores(bundle: Bundle, images: np.ndarray, strip_n: int) -> Scores:
    """Every signal's raw score (the full set), STRIP at N overlays; the fused verdict is left to the caller."""
    guard = build_pipeline(bundle, strip_n=strip_n, calibrated=False, signals=full_set(bundle))
    return {k: v.score for k, v in collect(guard, images).items()}


def fused_rates(sets: dict[str, Scores], signals: list[str], rule: str, fpr: float) -> dict[str, float]:
    """Fuse `signals` as calibration does (tables from half A, threshold from half B); TPR and FPR on the test."""
    fusion = fit_fusion({k: sets["a"][k] for k in signals}, rule)
    threshold = float(np.quantile(fusion.combine(sets["b"]), 1 - fpr))
    return {
        "tpr": rate(fusion.combine(sets["triggered"]) > threshold),
        "fpr": rate(fusion.combine(sets["clean"]) > threshold),
    }


def label_sources(
    bundle: Bundle, clean: np.ndarray, labels: np.ndarray, triggered: np.ndarray, true: np.ndarray, wanted: np.ndarray
) -> dict[str, dict[str, float]]:
    """Each label source a flagged image can take its label from (service.guard.SOURCES; those the bundle can give),
    under the bundle's own verdicts and label policy: the triggered images' attacker's-label and true-label rates and
    the clean accuracy through the guard."""
    from service.guard import GuardResult

    guard = build_pipeline(bundle)
    runs = {"clean": GuardResult.concat(guard.run_chunked(clean)),
            "triggered": GuardResult.concat(guard.run_chunked(triggered))}  # fmt: skip
    out = {}
    for source in runs["clean"].sources():
        given = {part: r.labels_from(source, r.backdoor, guard.infected) for part, r in runs.items()}
        out[source] = {
            "attack_success_after": rate(given["triggered"] == wanted),
            "triggered_true_label": rate(given["triggered"] == true),
            "clean_accuracy_guarded": rate(given["clean"] == labels),
        }
    return out


def source_summary(sources: dict[str, dict[str, dict[str, float]]], source: str) -> tuple[float, float]:
    """attack -> source -> rates: one source's worst attacker's-label rate over the attacks and its mean true-label
    rate."""
    rows = [s[source] for s in sources.values()]
    return max(r["attack_success_after"] for r in rows), float(np.mean([r["triggered_true_label"] for r in rows]))


def best_source(sources: dict[str, dict[str, dict[str, float]]]) -> str:
    """attack -> source -> rates: the source whose worst attacker's-label rate over the attacks is lowest (the label
    policy's first duty), then the highest mean true-label rate."""

    def key(source: str) -> tuple[float, float]:
        worst, mean = source_summary(sources, source)
        return worst, -mean

    return min(next(iter(sources.values())), key=key)


def signal_passes(bundle: Bundle, signals: list[str] | None = None) -> dict[str, int]:
    """Passes through a classifier-sized model each signal needs per image (default: the bundle's own): what its
    `prepare` hands its model for one image (the autoencoders are extra, not counted)."""
    one = bundle.strip_bank[:1]
    return {s.name: len(s.prepare(one)) for s in build_pipeline(bundle, calibrated=False, signals=signals).signals}


def candidates(signals: list[str], passes: dict[str, int]) -> dict[str, tuple[int, list[str], int]]:
    """name -> (STRIP N, signals, classifier passes per image): every N, each with the full set and without each
    one signal (detrigger stays: the label policy needs its restoration); the set without STRIP, and without STRIP
    and one more."""
    out = {}
    for n in STRIP_NS:
        for drop in (None, *(s for s in signals if s not in ("detrigger", "strip"))):
            keep = [s for s in signals if s != drop]
            cost = 1 + sum(passes[s] for s in keep if s != "strip") + (n if "strip" in keep else 0)
            out[f"N={n}" + (f" without {drop}" if drop else "")] = (n, keep, cost)
    without = [s for s in signals if s != "strip"]
    for drop in (None, *(s for s in without if s != "detrigger")):
        keep = [s for s in without if s != drop]
        out["without strip" + (f", {drop}" if drop else "")] = (STRIP_NS[-1], keep, 1 + sum(passes[s] for s in keep))
    return out


@dataclass(frozen=True)
class SelectionSet:
    """One suite attack's images for weighing choices: the calibration halves (where calibration fits the fusion)
    and the selection half of the test set, clean and triggered (victims only; `idx` into `labels`)."""

    name: str
    bundle: Bundle
    attack: AttackConfig
    half_a: np.ndarray
    half_b: np.ndarray
    clean: np.ndarray
    labels: np.ndarray
    idx: np.ndarray
    triggered: np.ndarray


def selection_sets(shipped: Path, n_images: int) -> Iterator[SelectionSet]:
    """Every attack of the suite (not the clean model) on the first n_images of the selection half (not the images
    make evaluate reports on), with its cached bundle."""
    ds = load_dataset(DataConfig())
    x_cal = to_model_input(ds.calibration.images)
    _, half_a, half_b = split_calibration(len(x_cal), CalibrationConfig())
    part = selection(n_images, len(ds.test.labels))
    pixels, labels = ds.test.images[part], ds.test.labels[part]
    clean = to_model_input(pixels)
    for name, entry in SUITE.items():
        if name == "clean":
            continue
        bundle = Bundle.load(suite_bundle(name, shipped))
        attack = PRESETS[entry.preset]
        idx = victims(labels, attack)
        triggered = to_model_input(triggered_pixels(pixels[idx], attack))
        yield SelectionSet(name, bundle, attack, x_cal[half_a], x_cal[half_b], clean, labels, idx, triggered)


def run(shipped: Path, n_images: int, slack: float, scores_path: Path | None = None) -> dict[str, Any]:
    attacks: dict[str, dict[str, dict[str, float]]] = {}
    configs: dict[str, tuple[int, list[str], int]] = {}
    kept: dict[str, np.ndarray] = {}
    sources: dict[str, dict[str, dict[str, float]]] = {}
    for sel in selection_sets(shipped, n_images):
        name, bundle, attack, clean, labels, idx, triggered = (
            sel.name, sel.bundle, sel.attack, sel.clean, sel.labels, sel.idx, sel.triggered
        )  # fmt: skip
        signals = full_set(bundle)
        configs = configs or candidates(signals, signal_passes(bundle, signals))
        rule = bundle.manifest["thresholds"]["fused"].get("rule", "max")
        fpr = float(bundle.manifest["thresholds"]["target_fpr"])
        by_n = {}
        for n in sorted({c[0] for c in configs.values()}):
            start = time.perf_counter()
            by_n[n] = {
                "a": raw_scores(bundle, sel.half_a, n), "b": raw_scores(bundle, sel.half_b, n),
                "clean": raw_scores(bundle, clean, n), "triggered": raw_scores(bundle, triggered, n),
            }  # fmt: skip
            log.info("%s: scores at N = %d in %.0f s", name, n, time.perf_counter() - start)
            kept.update({f"{name}/{n}/{part}/{k}": v for part, d in by_n[n].items() for k, v in d.items()})
        attacks[name] = {config: fused_rates(by_n[n], keep, rule, fpr) for config, (n, keep, _) in configs.items()}
        wanted = attack_labels(labels[idx], attack, len(bundle.class_names))
        sources[name] = label_sources(bundle, clean, labels, triggered, labels[idx], wanted)
    if scores_path is not None:  # every raw score, for looking further without recomputing (np.load)
        np.savez_compressed(scores_path, **kept)  # type: ignore[arg-type]
    full = next(iter(configs))
    rows = {}
    for config, (n, keep, cost) in configs.items():
        worst_tpr = min(attacks[a][config]["tpr"] - attacks[a][full]["tpr"] for a in attacks)
        worst_fpr = max(attacks[a][config]["fpr"] - attacks[a][full]["fpr"] for a in attacks)
        rows[config] = {
            "strip_n": n if "strip" in keep else 0, "signals": keep, "passes_per_image": cost,
            "worst_tpr_change": worst_tpr, "worst_fpr_change": worst_fpr,
            "qualifies": worst_tpr >= -slack and worst_fpr <= slack,
        }  # fmt: skip
    chosen = min((c for c in rows if rows[c]["qualifies"]), key=lambda c: (rows[c]["passes_per_image"], c))
    return {
        "full": full, "chosen": chosen, "slack": slack, "images": n_images, "first_image": SELECTION_START,
        "configs": rows, "attacks": attacks, "label_sources": sources, "label_source_chosen": best_source(sources),
    }  # fmt: skip


def rates_cell(rates: dict[str, float]) -> str:
    """A table cell: fused TPR / FPR in percent."""
    return f"{100 * rates['tpr']:.2f} / {100 * rates['fpr']:.2f}"


def render(r: dict[str, Any]) -> str:
    names = list(r["attacks"])
    lines = [
        "# Detection per cost",
        "",
        f"Made by `{r['command']}` ({r['seconds']:.0f} s). Fused TPR / FPR per suite attack for each candidate "
        f"configuration, each fused and thresholded exactly as calibration does ({which_test_images(r)}; the suite's "
        "bundles as `make evaluate` built them). A configuration qualifies when no attack loses more "
        f"than {100 * r['slack']:.1f} point of TPR or gains more than {100 * r['slack']:.1f} point of FPR against "
        f"`{r['full']}`.",
        "",
        "| configuration | passes per image | "
        + " | ".join(names)
        + " | worst TPR change | worst FPR change | qualifies |",
        "|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for config, row in r["configs"].items():
        cells = " | ".join(rates_cell(r["attacks"][a][config]) for a in names)
        lines.append(
            f"| {config} | {row['passes_per_image']} | {cells} | {100 * row['worst_tpr_change']:+.2f} | "
            f"{100 * row['worst_fpr_change']:+.2f} | {'yes' if row['qualifies'] else 'no'} |"
        )
    c = r["configs"][r["chosen"]]
    lines += ["", f"Cheapest that qualifies: **{r['chosen']}**, {c['passes_per_image']} classifier passes per image "
              f"(the full set: {r['configs'][r['full']]['passes_per_image']}).", ""]  # fmt: skip
    if "label_sources" in r:
        sources = list(next(iter(r["label_sources"].values())))
        lines += [
            "## Where a flagged image's label comes from",
            "",
            "Each label source under each bundle's own verdicts and label policy (the default signals; never the "
            "original label, nor one Neural Cleanse flagged): attacker's label / true label on the triggered "
            "images / clean accuracy through the guard, on the same images.",
            "",
            "| source | " + " | ".join(names) + " | worst attacker's label | mean true label |",
            "|---|" + "---|" * (len(names) + 2),
        ]
        for source in sources:
            rows = [r["label_sources"][a][source] for a in names]
            cells = " | ".join(
                f"{100 * x['attack_success_after']:.2f} / {100 * x['triggered_true_label']:.2f} / "
                f"{100 * x['clean_accuracy_guarded']:.2f}"
                for x in rows
            )
            worst, mean = source_summary(r["label_sources"], source)
            lines.append(f"| {source} | {cells} | {100 * worst:.2f} | {100 * mean:.2f} |")
        chosen = r["label_source_chosen"]
        lines += ["", f"Lowest worst attacker's label (then the highest mean true label): **{chosen}** "
                  "(`CalibrationConfig.label_source` holds the default).", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.cost", description=__doc__.splitlines()[0])
    # The suite's own 5,000 (make evaluate): at 2,000 a clean FPR near 1% moves by about 0.22 point (one standard
    # error) from sampling alone, as much as half the 0.5-point slack, and the choice flipped on it.
    p.add_argument(
        "--images",
        type=int,
        default=5000,
        help="test images per attack (clean, then triggered), from test image 5000 on (training.suite.SELECTION_START)",
    )
    p.add_argument("--slack", type=float, default=0.005, help="largest TPR loss / FPR gain a cheaper set may have")
    p.add_argument("--models", type=Path, default=Path("models"), help="the shipped bundle (the kwon entry)")
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--keep-scores", type=Path, default=None, help="also save every raw score here (.npz)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    report = run(args.models, args.images, args.slack, args.keep_scores)
    command = " ".join(["python -m training.cost", *(sys.argv[1:] if argv is None else argv)])
    write_report(report, command, start, args.out, "cost", render)


if __name__ == "__main__":
    main()
