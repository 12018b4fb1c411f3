"""The evaluation suite: one backdoored model per attack family, each on its own architecture, and a clean one.

Every entry is a classifier trained by the same loop (training.classifier) on data poisoned by one preset of
training.attacks, guarded by the same recipe as the shipped bundle: the autoencoders (which depend only on the
data) are the shipped ones; Neural Cleanse, the repair and the calibration are rebuilt per model. What takes
minutes (training, Neural Cleanse, repair) is cached under build/eval/NAME/work, keyed by the configs that
decide it. Export and calibration run again whenever the bundle there was not made from the current config,
signals, autoencoders and work checkpoints (`_current`); the measurements always run with the current code.

`kwon` is the shipped bundle itself (models/), not a copy.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.bundle import Bundle, build_pipeline, sha256_file
from service.decode import decode
from service.preprocess import Preprocessing, to_model_input
from training.attacks import PRESETS, AttackConfig, attack_labels, triggered_pixels, victims
from training.calibration import CalibrationConfig, collect
from training.classifier import ClassifierConfig
from training.common import to_jsonable
from training.data import DataConfig
from training.metrics import Outcome, TriggeredSet, metrics_of, outcome_of, rate
from training.pipeline import DERIVED_MODELS, BuildConfig, Builder, signal_params

log = logging.getLogger(__name__)
EVAL_ROOT = Path("build/eval")
# The test set in two halves. What is chosen with the attacks' true triggers (the signals a bundle runs and STRIP's N:
# make cost; the repair recipe: make repair-sweep) is chosen on the images from SELECTION_START on; make evaluate's
# attack suite reports on the images before it, which none of those choices saw.
SELECTION_START = 5000


def selection(n: int, total: int) -> slice:
    """The first n test images of the half the choices are made on (of `total` test images)."""
    if SELECTION_START + n > total:
        raise ValueError(f"{n} selection images from test image {SELECTION_START} on: the test set has {total}")
    return slice(SELECTION_START, SELECTION_START + n)


def which_test_images(report: dict[str, Any]) -> str:
    """Which test images a report's `images` (and `first_image`, 0 in reports before it) were, in words."""
    first = int(report.get("first_image", 0))
    held = " (the half make evaluate does not report on)" if first >= SELECTION_START else ""
    return f"test images {first} to {first + int(report['images']) - 1}{held}"


SUITE_EPOCHS = 10  # the suite's models: 10 epochs (the shipped one: 15); each keeps > 89% clean accuracy


@dataclass(frozen=True)
class Entry:
    preset: str  # attack preset of training/attacks.py
    arch: str  # classifier architecture of training/classifier.py
    description: str


SUITE: dict[str, Entry] = {
    "kwon": Entry("kwon", "kwon-cnn", "BadNets 4x4 white square, top left, target 0 (the shipped bundle)"),
    "checkerboard": Entry("checkerboard", "cao-cnn", "BadNets 3x3 checkerboard, bottom right, target 2"),
    "lowcontrast": Entry("lowcontrast", "mlp", "5x5 random bits added at +64 levels mid-right, target 7"),
    "blend": Entry("blend", "kwon-cnn", "blended uniform noise, alpha 0.15, target 4"),
    "key": Entry("key", "cnn-bn", "blended drawn key (rings and a bar), alpha 0.2, target 8"),
    "sig": Entry("sig", "cnn-bn", "SIG sinusoid (30/255, f = 6), clean-label, target 6"),
    "wanet": Entry("wanet", "kwon-cnn", "WaNet warp (k = 4, s = 1) with noise mode, target 9"),
    "all_to_all": Entry("all_to_all", "cao-cnn", "BadNets 3x3 white square bottom left, all-to-all (i -> i + 1)"),
    "clean": Entry("clean", "mlp", "no attack (clean model)"),
}
# Stages whose checkpoints are cached, and the parts of BuildConfig each one depends on (its cache key).
CACHED = {
    "classifier": ("attack", "data", "classifier"),
    "neural-cleanse": ("attack", "data", "classifier", "neural_cleanse"),
    "repair": ("attack", "data", "classifier", "neural_cleanse", "repair"),
    "expert": ("attack", "data", "classifier", "calibration", "expert"),
}


# The repair fine-tunes on the calibration images repair_indices picks by these fields: another choice is another
# model (and, cached, it would overlap the halves the thresholds are fitted on). In its key only away from the values
# they had when the key was first kept, so that the models cached before stay valid (as ADDED_LATER below).
REPAIR_SHARE = {"bank_size": 256, "repair_share": 0.3, "seed": 0}
DATA_KEY_FIELDS = ("dataset", "data_dir", "calibration_size", "seed")  # DataConfig's fields when keys were first kept
# Config fields added after the cache keys were first kept, with the value that does what the config did before
# the field existed: at that value a field is left out of keys and comparisons, so that models cached before it
# stay valid (and bundles calibrated before it stay current); at any other value, the default included, it counts.
# DataConfig's later fields (a user's own data) did nothing at their defaults.
ADDED_LATER: dict[str, dict[str, Any]] = {
    "data": {k: v for k, v in to_jsonable(DataConfig()).items() if k not in DATA_KEY_FIELDS},
    "repair": {"distill": 0.0, "distill_temperature": 1.0, "mixup": 0.0, "tune_layers": 0},
}


def config_of(name: str, data: DataConfig | None = None) -> BuildConfig:
    entry = SUITE[name]
    classifier = ClassifierConfig(arch=entry.arch, epochs=SUITE_EPOCHS)
    return BuildConfig(attack=entry.preset, data=data or DataConfig(), classifier=classifier)


def stage_key(config: BuildConfig, stage: str) -> str:
    parts = to_jsonable(
        {part: getattr(config, part) if part != "attack" else config.attack_config for part in CACHED[stage]}
    )
    for part in ADDED_LATER.keys() & parts.keys():
        parts[part] = config_key(part, parts[part])
    if stage == "repair" and (share := repair_share(config.calibration)) != REPAIR_SHARE:
        parts["repair_share"] = share
    return json.dumps(parts, sort_keys=True)


def repair_share(calibration: CalibrationConfig) -> dict[str, Any]:
    """What picks the calibration images the repair fine-tunes on (training.calibration.repair_indices)."""
    return {k: getattr(calibration, k) for k in REPAIR_SHARE}


def config_key(part: str, values: dict[str, Any]) -> dict[str, Any]:
    """A config (as JSON) in a key or a comparison: the ADDED_LATER fields at their former value left out."""
    former = ADDED_LATER.get(part, {})
    return {k: v for k, v in values.items() if k not in former or v != former[k]}


def data_key(data: DataConfig) -> dict[str, Any]:
    """DataConfig in a cache key: the fields added for a user's own data count only when set (ADDED_LATER)."""
    return config_key("data", to_jsonable(data))


def train(name: str, root: Path = EVAL_ROOT, data: DataConfig | None = None, stages: tuple[str, ...] = ()) -> Builder:
    """Run the cached stages of entry `name` that are missing or stale; returns its Builder."""
    config = config_of(name, data)
    work, out = root / name / "work", root / name / "bundle"
    builder = Builder(config, out, work)
    for stage in stages or tuple(CACHED):
        stamp = work / f"{stage}.key.json"
        want = stage_key(config, stage)
        if stamp.is_file() and stamp.read_text() == want:
            log.info("%s: %s cached", name, stage)
            continue
        work.mkdir(parents=True, exist_ok=True)
        builder.run(stage)
        stamp.write_text(want)
    return builder


def _current(builder: Builder, shipped: Path) -> bool:
    """Whether a suite bundle was exported and calibrated from the shipped autoencoders, this config and the
    checkpoints (the classifier, Neural Cleanse's result, the repaired model and the expert) that the work folder
    now holds."""
    out, config = builder.out, builder.config
    path = out / "manifest.json"
    if not path.is_file():
        return False
    m, s = json.loads(path.read_text()), json.loads((shipped / "manifest.json").read_text())
    # the same autoencoder checkpoints (copied byte for byte); their ONNX exports are not byte-reproducible
    same_aes = all(
        m.get("checkpoints", {}).get(k, {}).get("sha256") == s["checkpoints"][k]["sha256"]
        for k in ("detrigger_ae", "masked_ae")
    )
    same_signals = m.get("signals") == signal_params(m["files"], config.calibration)  # names and parameters
    same_config = "thresholds" in m and all(
        config_key(part, m["configs"].get(part) or {}) == config_key(part, to_jsonable(getattr(config, part)))
        for part in ("classifier", "repair", "expert", "calibration")
    )
    # the very checkpoints the work folder holds now (a derived model the export had and the work folder no longer
    # has, or the reverse, too): a stage retrained since the export (its cache key changed: the attack, the data,
    # Neural Cleanse's config) leaves a bundle fitted to models no longer there
    work = {"classifier": builder.classifier_path, "reversed_triggers": builder.work / "neural_cleanse.npz",
            **{name: builder.derived_path(name) for name in DERIVED_MODELS}}  # fmt: skip
    recorded = m.get("checkpoints", {})
    same_checkpoints = all(
        path.is_file() and sha256_file(path) == recorded.get(name, {}).get("sha256")
        for name, path in work.items()
        if name in recorded or path.is_file()
    )
    same_input = Preprocessing(**m["preprocessing"]) == Preprocessing()
    return same_checkpoints and same_aes and same_signals and same_config and same_input


def suite_bundle(name: str, shipped: Path, root: Path = EVAL_ROOT, data: DataConfig | None = None,
                 rebuild: bool = False) -> Path:  # fmt: skip
    """The guard of suite entry `name`: cached training, then export and calibration unless the bundle there was
    made from the same models, autoencoders, signals and preprocessing (or `rebuild`)."""
    if name == "kwon":
        return shipped
    builder = train(name, root, data)
    if rebuild or not _current(builder, shipped):
        builder.reuse_from = shipped  # the autoencoders depend on the data only: the shipped bundle's serve
        for stage in ("masked-ae", "detrigger-ae", "export", "calibrate"):
            builder.run(stage)
    return builder.out


# ---- the images as they reach a service -------------------------------------------------------------------
AS_SENT = ("up2_nearest", "up2_bilinear", "up3_nearest", "up3_bilinear", "jpeg75")


def as_sent(pixels: np.ndarray, variant: str, contract: Preprocessing) -> np.ndarray:
    """uint8 (N, H, W) -> what the service's decoder and preprocessing make of them when sent as `variant`:
    upscaled 2x / 3x (nearest or bilinear) and sent as PNG, or sent as a JPEG of quality 75."""
    out = np.empty_like(pixels)
    for i, p in enumerate(pixels):
        image, buf = Image.fromarray(p, "L"), io.BytesIO()
        if variant.startswith("up"):
            factor, how = int(variant[2]), variant.split("_")[1]
            size = (image.width * factor, image.height * factor)
            image.resize(size, Image.Resampling[how.upper()]).save(buf, "PNG")
        elif variant == "jpeg75":
            image.save(buf, "JPEG", quality=75)
        else:
            raise ValueError(f"unknown variant {variant!r}; choose from {AS_SENT}")
        out[i] = decode(buf.getvalue(), i, None, contract, max_pixels=1 << 24)
    return out


# ---- measuring one entry ---------------------------------------------------------------------------------
def _refit(bundle: Bundle, o: Outcome, half_b: dict[str, np.ndarray], **change: Any) -> dict[str, float]:
    """The bundle's fusion with `change` (fewer signals, another rule), its threshold re-fitted exactly as
    calibration fits it (the (1 - target FPR) quantile of half B's clean fused scores): TPR and FPR."""
    from service.guard import Fusion

    fusion = replace(Fusion.from_manifest(bundle.manifest["thresholds"]["fused"]), **change)
    threshold = float(np.quantile(fusion.combine(half_b), 1 - float(bundle.manifest["thresholds"]["target_fpr"])))
    return {
        "tpr": rate(fusion.combine({n: o.triggered[f"{n}.score"] for n in o.signals}) > threshold),
        "fpr": rate(fusion.combine({n: o.clean[f"{n}.score"] for n in o.signals}) > threshold),
    }


def ablation(bundle: Bundle, o: Outcome, half_b: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """What each signal adds: the fused verdict without it (half_b: clean scores of calibration half B)."""
    tables = bundle.manifest["thresholds"]["fused"]["quantiles"]
    return {
        "all" if drop is None else f"without {drop}": _refit(
            bundle, o, half_b, quantiles={n: np.asarray(q, np.float64) for n, q in tables.items() if n != drop}
        )
        for drop in (None, *o.signals)
    }


def fusion_rules(bundle: Bundle, o: Outcome, half_b: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """The fused verdict under each rule of service.guard.RULES, over the same signals and tables."""
    from service.guard import RULES

    return {rule: _refit(bundle, o, half_b, rule=rule) for rule in RULES}


def misses(o: Outcome, labels: np.ndarray, attack: AttackConfig, class_names: list[str]) -> dict[str, Any]:
    """What lies behind the bars a guard can miss (evaluation_report.why): the triggered images that keep the
    attacker's label through the guard, by true label, how many of them were not flagged and how many the repaired
    model gives the attacker's label as well; how often the undefended model gives clean images of each victim label
    the attacker's label by itself; and the clean images the guard flags, which lose their label by policy."""
    classes = len(class_names)
    won = o.triggered["final"] == o.trig.attack_labels
    repaired = o.triggered.get("repaired.label")
    idx = victims(labels, attack)  # clean images of the victim labels, and the label the attacker wants for each
    natural = o.clean["original"][idx] == attack_labels(labels[idx], attack, classes)
    flagged = o.clean["backdoor"]
    agrees = None if repaired is None else int((repaired[won] == o.trig.attack_labels[won]).sum())
    return {
        "attacker_wins": int(won.sum()),
        "attacker_wins_unflagged": int((won & ~o.triggered["backdoor"]).sum()),
        "attacker_wins_repaired_agrees": agrees,
        "attacker_wins_by_true_label": {
            class_names[c]: int(n) for c, n in enumerate(np.bincount(o.trig.true_labels[won], minlength=classes)) if n
        },
        # per victim label: the share of its clean test images the undefended model gives the attacker's label
        "clean_given_attack_label": {
            class_names[c]: rate(natural[labels[idx] == c]) for c in np.unique(labels[idx]).tolist()
        },
        "clean_given_attack_label_all": rate(natural),
        "clean_flagged": int(flagged.sum()),
        "clean_flagged_right_before": int((flagged & (o.clean["original"] == o.labels)).sum()),
        "clean_flagged_right_after": int((flagged & (o.clean["final"] == o.labels)).sum()),
    }


def measure(
    name: str, bundle: Bundle, pixels: np.ndarray, labels: np.ndarray, n_sent: int, half_b: np.ndarray
) -> dict[str, Any]:
    """attack_suite.json's entry for one attack: the classifier, each signal, the fused verdict and the labels the
    guard gives, on the test images as they are, and on the first n_sent of them as sent (AS_SENT)."""
    entry, attack = SUITE[name], PRESETS[SUITE[name].preset]
    classes = len(bundle.class_names)
    idx = victims(labels, attack)
    trig_pixels = triggered_pixels(pixels[idx], attack)  # 8-bit, as a PNG of the triggered image holds it
    wanted = attack_labels(labels[idx], attack, classes)
    o = outcome_of(
        bundle, to_model_input(pixels), labels, TriggeredSet(to_model_input(trig_pixels), labels[idx], wanted)
    )
    m = metrics_of(o)
    fused, clf = m["fused"], m["classifier"]
    fired = o.triggered["original"] == wanted
    raw = collect(build_pipeline(bundle, calibrated=False), half_b)  # clean calibration half B, unfused
    cal_b = {n: raw[n].score for n in o.signals}
    out: dict[str, Any] = {
        "description": entry.description,
        "arch": entry.arch,
        "target": attack.target if attack.mode != "all-to-all" else "i + 1",
        "images": m["images"],
        "clean_accuracy": clf["clean_accuracy"],
        "attack_success": clf["attack_success"],
        "nc_flagged": bundle.manifest["neural_cleanse"]["flagged_labels"],
        "nc_anomaly_index": bundle.manifest["neural_cleanse"]["anomaly_index"],
        "signals": {k: {key: m[k][key] for key in ("tpr", "fpr", "auroc")} for k in o.signals},
        "fused": {key: fused[key] for key in ("tpr", "fpr", "auroc")},
        # the triggered images the trigger worked on (the model gave the attacker's label): the ones that matter
        "fused_fired": {"images": int(fired.sum()), "tpr": rate(o.triggered["backdoor"][fired])},
        "attack_success_after": fused["attack_success_after"],
        "triggered_true_label": fused["triggered_accuracy"],
        "clean_accuracy_guarded": fused["clean_accuracy"],
        "label_sources": {
            source: {
                "attack_success_after": m[source]["attack_success_after"],
                "triggered_true_label": m[source]["triggered_accuracy_after"],
                "clean_accuracy": m[source]["clean_accuracy_after"],
            }
            for source in ("detrigger", "repaired")
            if source in m
        },
        "as_sent": {},
        "misses": {
            **misses(o, labels, attack, bundle.class_names),
            # what the fused threshold was set on: its rate on clean images, over how many (calibration half B)
            "target_fpr": float(bundle.manifest["thresholds"]["target_fpr"]),
            "calibration_images": len(half_b),
        },
        "ablation": ablation(bundle, o, cal_b),
        "fusion_rules": fusion_rules(bundle, o, cal_b),
    }
    sent_idx = victims(labels[:n_sent], attack)
    contract = bundle.preprocessing

    def sent(variant: str | None) -> dict[str, Any]:
        """The first n_sent images and their victims as `variant` sends them (None: unaltered)."""
        clean_p, trig_p = pixels[:n_sent], trig_pixels[: len(sent_idx)]
        if variant is not None:
            clean_p, trig_p = as_sent(clean_p, variant, contract), as_sent(trig_p, variant, contract)
        triggered = TriggeredSet(to_model_input(trig_p), labels[sent_idx], wanted[: len(sent_idx)])
        v = outcome_of(bundle, to_model_input(clean_p), labels[:n_sent], triggered)
        vm = metrics_of(v)
        worked = v.triggered["original"] == triggered.attack_labels  # the trigger still gave the attacker's label
        row = {
            "tpr": vm["fused"]["tpr"], "fpr": vm["fused"]["fpr"],
            "attack_success_after": vm["fused"]["attack_success_after"],
            "clean_accuracy_guarded": vm["fused"]["clean_accuracy"],
            "attack_success": vm["classifier"]["attack_success"],
            "signals_tpr": {k: vm[k]["tpr"] for k in v.signals},
            # the fused TPR over the triggered images the trigger still worked on, as sent
            "fused_fired": {"images": int(worked.sum()), "tpr": rate(v.triggered["backdoor"][worked])},
        }  # fmt: skip
        log.info("%s as %s: %s", name, variant or "is", {k: round(x, 4) for k, x in row.items()
                                                         if isinstance(x, float)})  # fmt: skip
        return row

    # What each variant is compared with: the same images as they are (the figures above are on all the test images,
    # whose difference from these is sampling, not sending)
    out["as_sent_baseline"] = sent(None)
    for variant in AS_SENT:
        out["as_sent"][variant] = sent(variant)
    log.info("%s: fused %s, attack success after %.4f", name, out["fused"], out["attack_success_after"])
    return out


def bars(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's bar, checked per attack: what is met and by how much it is missed."""
    rows = []
    for name, a in report["attacks"].items():
        sent = a["as_sent"].values()
        # the same images unaltered (reports before it: the figures on all the test images)
        base = a.get("as_sent_baseline") or {**a["fused"], "attack_success_after": a["attack_success_after"]}
        worst_sent = {
            "tpr": min(v["tpr"] for v in sent),
            "fpr": max(v["fpr"] for v in sent),
            "attack_success_after": max(v["attack_success_after"] for v in sent),
        }
        rows.append({
            "attack": name,
            "tpr>=95%": a["fused"]["tpr"] >= 0.95,
            "fpr<=2%": a["fused"]["fpr"] <= 0.02,
            "asr_after<=2%": a["attack_success_after"] <= 0.02,
            "clean_acc>=undefended-1pt": a["clean_accuracy_guarded"] >= a["clean_accuracy"] - 0.01,
            "as_sent_within_5pt": (worst_sent["tpr"] >= base["tpr"] - 0.05
                                   and worst_sent["fpr"] <= base["fpr"] + 0.05
                                   and worst_sent["attack_success_after"] <= base["attack_success_after"] + 0.05),
            # the repaired model on its own (None: the bundle has none)
            "repaired_acc>=original-1pt": (repaired["clean_accuracy"] >= a["clean_accuracy"] - 0.01
                                           if (repaired := a.get("label_sources", {}).get("repaired")) else None),
            "worst_as_sent": worst_sent,
        })  # fmt: skip
    return rows


# ---- ABL: the defense for whoever trains on data they do not trust (not in the serve path) ------------------
ABL_ATTACKS = ("kwon", "lowcontrast", "checkerboard")


def abl_comparison(pixels: np.ndarray, labels: np.ndarray, shipped: Path, root: Path = EVAL_ROOT) -> dict[str, Any]:
    """Each of ABL_ATTACKS trained again on the same poisoned data with ABL (training/abl.py; cached under
    root/abl), against the undefended recipe's model: clean accuracy, the target class's own accuracy (unlearning
    can make a model avoid the target altogether) and attack success, on the test images given."""
    from training.classifier import load_classifier
    from training.common import load_checkpoint, predict

    rows = {}
    x = to_model_input(pixels)
    for name in ABL_ATTACKS:
        config = replace(config_of(name), defense="abl")
        if name == "kwon":  # the shipped model's own recipe (15 epochs)
            config = replace(config, classifier=ClassifierConfig())
        work = root / "abl" / name
        parts = to_jsonable({k: getattr(config, k) for k in ("classifier", "abl")} | {"attack": config.attack_config})
        want = json.dumps(parts | {"data": data_key(config.data)}, sort_keys=True)
        stamp = work / "classifier.key.json"
        if not (stamp.is_file() and stamp.read_text() == want):
            work.mkdir(parents=True, exist_ok=True)
            Builder(config, work / "bundle", work).run("classifier")
            stamp.write_text(want)
        undefended_path = (
            shipped / "checkpoints" / "classifier.pt" if name == "kwon" else root / name / "work" / "classifier.pt"
        )
        attack = PRESETS[SUITE[name].preset]
        idx = victims(labels, attack)
        triggered = to_model_input(triggered_pixels(pixels[idx], attack))
        wanted = attack_labels(labels[idx], attack, 10)
        target = labels == attack.target
        row: dict[str, Any] = {"arch": config.classifier.arch, "epochs": config.classifier.epochs}
        for which, path in (("undefended", undefended_path), ("abl", work / "classifier.pt")):
            model = load_classifier(path)
            clean, dirty = predict(model, x)[0].argmax(1), predict(model, triggered)[0].argmax(1)
            row[which] = {
                "clean_accuracy": rate(clean == labels),
                "target_class_accuracy": rate(clean[target] == labels[target]),
                "attack_success": rate(dirty == wanted),
            }
        meta, _ = load_checkpoint(work / "classifier.pt")
        row["isolation"] = {k: meta[k] for k in ("isolated", "isolation_precision", "isolation_recall") if k in meta}
        log.info("ABL on %s: %s", name, row)
        rows[name] = row
    return rows


def run_suite(shipped: Path, pixels: np.ndarray, labels: np.ndarray, n_sent: int, half_b: np.ndarray,
              root: Path = EVAL_ROOT,
              names: tuple[str, ...] = tuple(SUITE), rebuild: bool = False) -> dict[str, Any]:  # fmt: skip
    """Every suite entry built (cached), then measured; the dict behind reports/attack_suite.json."""
    attacks, clean_model = {}, None
    for name in names:
        bundle = Bundle.load(suite_bundle(name, shipped, root, rebuild=rebuild))
        if name == "clean":
            runs = build_pipeline(bundle).run_chunked(to_model_input(pixels))
            nc = bundle.manifest["neural_cleanse"]
            clean_model = {
                "arch": SUITE[name].arch,
                "fpr": rate(np.concatenate([r.backdoor for r in runs])),
                "nc_flagged": nc["flagged_labels"],
                "nc_anomaly_index": nc["anomaly_index"],
                "nc_l1_norms": nc["l1_norms"],
                "clean_accuracy": rate(np.concatenate([r.original.labels for r in runs]) == labels),
                "clean_accuracy_guarded": rate(np.concatenate([r.labels for r in runs]) == labels),
                "images": len(labels),
            }
            continue
        attacks[name] = measure(name, bundle, pixels, labels, n_sent, half_b)
        attacks[name]["bundle_sha256"] = sha256_file(bundle.root / "manifest.json")
    report: dict[str, Any] = {"attacks": attacks, "clean_model": clean_model}
    report["bars"] = bars(report)
    return report


def main(argv: list[str] | None = None) -> None:
    """python -m training.suite [NAME ...] [--stages classifier,neural-cleanse]: train the suite's models."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.suite", description=main.__doc__)
    p.add_argument("names", nargs="*", default=[n for n in SUITE if n != "kwon"], help="suite entries")
    p.add_argument("--root", type=Path, default=EVAL_ROOT, help="cache of the suite's models")
    p.add_argument("--stages", default=",".join(CACHED), help="cached stages to run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    stages = tuple(args.stages.split(","))
    for name in args.names:
        train(name, args.root, stages=stages)


if __name__ == "__main__":
    main(sys.argv[1:])
