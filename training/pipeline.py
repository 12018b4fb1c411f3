"""All stages in order, each runnable alone: checkpoints go to a work folder, the bundle to `out`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
import torch

from service.bundle import Bundle, read_manifest, sha256_file
from service.preprocess import Preprocessing, to_model_input
from training import report
from training.abl import ABLConfig, train_abl
from training.attacks import PRESETS, AttackConfig, load_probe, poison
from training.autoencoders import (
    DetriggerAE,
    DetriggerConfig,
    MaskedAE,
    MaskedAEConfig,
    MaskedRestorer,
    train_detrigger,
    train_masked,
)
from training.calibration import (
    CalibrationConfig,
    calibrate,
    min_calibration_images,
    repair_indices,
    split_calibration,
)
from training.classifier import ClassifierConfig, load_classifier, save_classifier, train_classifier, unwrap
from training.common import copy_checkpoint, load_checkpoint, predict, save_checkpoint, to_jsonable, write_json
from training.data import DataConfig, Dataset, load_dataset
from training.expert import ExpertConfig, train_expert
from training.export import (
    ExportConfig,
    ReversedTriggers,
    copy_checkpoints,
    export_onnx,
    update_manifest,
    write_bank,
)
from training.metrics import defender_metrics, evaluate
from training.neural_cleanse import NeuralCleanseConfig, NeuralCleanseResult, run_neural_cleanse
from training.repair import RepairConfig, repair, suspects

log = logging.getLogger(__name__)
# A given classifier must label the calibration images better than chance by this share of the way to 100%
# (Builder.check_given_classifier): 32.5% for 10 classes, 50% for 3, 62.5% for 2.
MIN_GAIN_OVER_CHANCE = 0.25
# The order `all` runs them in; `control` (a clean model for Neural Cleanse's false-alarm check) is optional.
STAGES = (
    "data", "classifier", "control", "masked-ae", "detrigger-ae", "neural-cleanse", "repair", "expert", "export",
    "calibrate", "metrics",
)  # fmt: skip
# What a new bundle runs (manifest `signals`), with parameters; a signal that needs a model of its own
# (SIGNAL_MODELS) only when the stage that makes that model ran.
# masked_ae, squeeze and strip stay available (a bundle whose manifest lists them runs them) but are not in the
# default. For masked_ae and squeeze the suite's ablation showed neither adds a point of TPR on any attack, and under
# the Fisher fusion every extra signal's clean noise raises the threshold (make evaluate: reports/evaluation.md,
# ablation). STRIP left when make cost (reports/cost.md) found the set without it within 0.5 point of TPR and FPR
# of the set with it at N = 32 on every suite attack, at 4 classifier passes per image instead of 5 to 36. The
# expert stays though make cost, on the half of the test set the suite does not report on, finds the set without
# it too within the bar: by 0.01 point of TPR (under the low-contrast patch's sampling error), and at +0.10 point of
# the shipped bundle's FPR there, which would take its FPR over HTTP (0.82%) past its 0.9% bar.
SIGNALS: dict[str, dict[str, object]] = {
    "detrigger": {}, "activation": {}, "repaired": {"score": "jeffreys"}, "expert": {}, "mahalanobis": {},
}  # fmt: skip
SIGNAL_MODELS = {"repaired": "repaired_classifier", "expert": "backdoor_expert"}  # signal -> the model it runs
DERIVED_MODELS = tuple(SIGNAL_MODELS.values())  # copies of the classifier that stages fine-tune (repair, expert)


# What depends only on the data: the autoencoders (stage -> checkpoint). Built once per dataset and reused: from the
# cache (keyed by the training images' digest and the stage's config) or from an existing bundle (--reuse-from).
AUTOENCODERS = {"masked-ae": "masked_ae", "detrigger-ae": "detrigger_ae"}
CACHE_ENV = "GUARD_CACHE_DIR"  # default build/cache


def bundle_signals(files: Collection[str]) -> list[str]:
    """The SIGNALS a bundle with these model files runs."""
    return [name for name in SIGNALS if name not in SIGNAL_MODELS or SIGNAL_MODELS[name] in files]


def signal_params(files: Collection[str], calibration: CalibrationConfig) -> dict[str, dict[str, object]]:
    """The manifest's `signals` of a new bundle with these model files: name -> parameters (STRIP's N and
    blend from the calibration config)."""
    strip: dict[str, object] = {"n": calibration.strip_n, "blend": calibration.strip_blend}
    return {name: strip if name == "strip" else SIGNALS[name] for name in bundle_signals(files)}


@dataclass(frozen=True)
class BuildConfig:
    attack: str = "kwon"  # preset of training/attacks.py that trains the demo classifier and is measured
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    masked_ae: MaskedAEConfig = field(default_factory=MaskedAEConfig)
    detrigger: DetriggerConfig = field(default_factory=DetriggerConfig)
    neural_cleanse: NeuralCleanseConfig = field(default_factory=NeuralCleanseConfig)
    repair: RepairConfig = field(default_factory=RepairConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    defense: str = "none"  # how the classifier stage trains: one of DEFENSES (abl: training/abl.py)
    abl: ABLConfig = field(default_factory=ABLConfig)  # used when defense is abl
    # A trigger the user knows, measured in a user model's report (training.attacks.load_probe): FILE.npz with
    # mask and pattern, or MODULE:FUNCTION; with the label it pushes to (None: the one it pushes to most).
    probe_trigger: str | None = None
    probe_target: int | None = None
    train_limit: int | None = None  # use only the first N images of each split (smoke runs); None = all
    calibration_limit: int | None = None
    test_limit: int | None = None
    DEFENSES: ClassVar[tuple[str, ...]] = ("none", "abl")  # training defenses of the classifier stage

    def __post_init__(self) -> None:
        if self.defense not in self.DEFENSES:
            raise ValueError(f"unknown defense {self.defense!r}; choose from {list(self.DEFENSES)}")

    @property
    def attack_config(self) -> AttackConfig:
        if self.attack not in PRESETS:
            raise ValueError(f"unknown attack preset {self.attack!r}; choose from {sorted(PRESETS)}")
        return PRESETS[self.attack]


def smoke(config: BuildConfig) -> BuildConfig:
    """Every stage on a tiny subset: checks the mechanics in well under a minute, not the quality."""
    return replace(
        config,
        classifier=replace(config.classifier, epochs=1),
        masked_ae=replace(config.masked_ae, epochs=1),
        detrigger=replace(config.detrigger, epochs=1),
        neural_cleanse=replace(config.neural_cleanse, steps=20, round_steps=5),
        repair=replace(config.repair, epochs=1, adv_steps=1),
        expert=replace(config.expert, max_epochs=1),
        calibration=replace(config.calibration, strip_n=8, bank_size=64),
        export=replace(config.export, parity_images=64),
        train_limit=2000,
        calibration_limit=600,
        test_limit=300,
    )


def with_seed(config: BuildConfig, seed: int) -> BuildConfig:
    """One seed for every stage."""
    return replace(
        config,
        data=replace(config.data, seed=seed),
        classifier=replace(config.classifier, seed=seed),
        masked_ae=replace(config.masked_ae, seed=seed),
        detrigger=replace(config.detrigger, seed=seed),
        neural_cleanse=replace(config.neural_cleanse, seed=seed),
        repair=replace(config.repair, seed=seed),
        expert=replace(config.expert, seed=seed),
        calibration=replace(config.calibration, seed=seed),
    )


class Builder:
    """Runs stages; each reads what earlier stages left in `work` (checkpoints) or `out` (the bundle)."""

    def __init__(
        self,
        config: BuildConfig,
        out: Path,
        work: Path,
        classifier: Path | None = None,
        reuse_from: Path | None = None,
        cache: Path | None = None,
    ) -> None:
        """reuse_from: a bundle built on the same data whose autoencoders to take; cache: where autoencoders are
        kept by data digest (default $GUARD_CACHE_DIR or build/cache)."""
        self.config, self.out, self.work = config, Path(out), Path(work)
        self.user_classifier = classifier
        self.reuse_from = reuse_from
        self.cache = Path(cache or os.environ.get(CACHE_ENV, "build/cache"))
        self.timings: dict[str, float] = {}

    # ---- data -------------------------------------------------------------------------------------
    @cached_property
    def dataset(self) -> Dataset:
        ds = load_dataset(self.config.data)
        c = self.config
        return replace(
            ds,
            train=ds.train.head(c.train_limit or len(ds.train)),
            calibration=ds.calibration.head(c.calibration_limit or len(ds.calibration)),
            test=ds.test.head(c.test_limit or len(ds.test)),
        )

    @property
    def contract(self) -> Preprocessing:
        """The model's input: size, colour, normalisation (the manifest's `preprocessing`)."""
        return self.dataset.contract

    @cached_property
    def x_train(self) -> np.ndarray:
        return to_model_input(self.dataset.train.images, self.contract)

    @cached_property
    def x_cal(self) -> np.ndarray:
        return to_model_input(self.dataset.calibration.images, self.contract)

    @cached_property
    def x_test(self) -> np.ndarray:
        return to_model_input(self.dataset.test.images, self.contract)

    def load_classifier(self, path: Path) -> torch.nn.Module:
        return load_classifier(path, self.contract)

    @cached_property
    def data_digest(self) -> str:
        """SHA-256 of what the autoencoders learn from: the contract and the training split's pixels."""
        digest = hashlib.sha256(json.dumps(self.contract.to_dict(), sort_keys=True).encode())
        digest.update(np.ascontiguousarray(self.dataset.train.images).data)  # the buffer, not a bytes copy
        return digest.hexdigest()

    def _autoencoder(
        self, stage: str, config: MaskedAEConfig | DetriggerConfig, train: Callable[..., torch.nn.Module]
    ) -> None:
        """Take from --reuse-from, or from the cache, or train (`train(x_train, config)`) the autoencoder of
        `stage`."""
        name = AUTOENCODERS[stage]
        path = self.work / f"{name}.pt"
        self.work.mkdir(parents=True, exist_ok=True)
        if self.reuse_from is not None:
            self._take_from_bundle(name, path)
            return
        key = hashlib.sha256(json.dumps([self.data_digest, name, to_jsonable(config)]).encode()).hexdigest()
        cached = self.cache / key[:24] / path.name
        if cached.is_file() and cached.with_suffix(".json").is_file():
            copy_checkpoint(cached, path)
            log.info("%s: reused %s (same training images and config)", name, cached)
            return
        model = train(self.x_train, config)
        save_checkpoint(path, model, stage, config, input_shape=list(self.contract.chw), data_digest=self.data_digest)
        cached.parent.mkdir(parents=True, exist_ok=True)
        copy_checkpoint(path, cached)

    def _take_from_bundle(self, name: str, path: Path) -> None:
        """An autoencoder from the bundle at reuse_from: refused unless its file is the one its manifest lists,
        its input is ours and (where it records one) it was trained on these very images."""
        assert self.reuse_from is not None
        root = self.reuse_from
        manifest = read_manifest(root)
        theirs = Preprocessing(**manifest["preprocessing"])
        if theirs.chw != self.contract.chw:
            raise ValueError(f"--reuse-from {root}: its models take {list(theirs.chw)} images, this data gives "
                             f"{list(self.contract.chw)}")  # fmt: skip
        entry = manifest.get("checkpoints", {}).get(name)
        if entry is None:
            raise ValueError(f"--reuse-from {root}: its manifest lists no {name} checkpoint")
        source = root / entry["path"]
        if not source.is_file() or sha256_file(source) != entry["sha256"]:
            raise ValueError(f"--reuse-from {root}: {source} is missing or not the file its manifest lists (SHA-256)")
        meta = json.loads(source.with_suffix(".json").read_text())
        recorded = meta.get("data_digest")
        if recorded is not None and recorded != self.data_digest:
            raise ValueError(f"--reuse-from {root}: its {name} was trained on other images (data digest "
                             f"{recorded[:12]}..., this data {self.data_digest[:12]}...)")  # fmt: skip
        if recorded is None:
            log.warning("--reuse-from %s: %s records no data digest (built before digests); trusting that it was "
                        "trained on this data", root, name)  # fmt: skip
        copy_checkpoint(source, path)
        log.info("%s: taken from %s", name, root)

    @property
    def num_classes(self) -> int:
        return len(self.dataset.class_names)

    @property
    def classifier_path(self) -> Path:
        return self.user_classifier or self.work / "classifier.pt"

    def run(self, stage: str) -> None:
        start = time.perf_counter()
        log.info("stage %s ...", stage)
        getattr(self, "stage_" + stage.replace("-", "_"))()
        self.timings[stage] = round(time.perf_counter() - start, 1)
        log.info("stage %s done in %.1f s", stage, self.timings[stage])

    # ---- stages -----------------------------------------------------------------------------------
    def stage_data(self) -> None:
        ds = self.dataset
        c = self.config.calibration
        if len(ds.calibration) < (least := min_calibration_images(c)):  # found here, not stages later at repair
            raise ValueError(
                f"{ds.name}: {len(ds.calibration)} calibration images; the build needs at least {least} (a STRIP bank "
                f"of {c.bank_size}, a repair share of {c.repair_share:.0%}, two halves to set thresholds on): give "
                "more images, or a val/ split folder (x_val/y_val in an .npz) of that many"
            )
        log.info(
            "%s: train %d / calibration %d / test %d images, %d classes, %s %dx%d",
            ds.name, len(ds.train), len(ds.calibration), len(ds.test), self.num_classes,
            self.contract.color, self.contract.height, self.contract.width,
        )  # fmt: skip

    def _train_classifier(self, attack: AttackConfig, path: Path) -> None:
        images, labels, chosen = poison(self.x_train, self.dataset.train.labels, attack, self.num_classes)
        c = self.config
        extra: dict[str, object] = {}
        if c.defense == "abl":  # `chosen` only measures the isolation: the defender never sees it
            abl = c.abl.resolved(c.classifier)
            model, facts = train_abl(images, labels, c.classifier, abl, self.num_classes, poisoned=chosen)
            extra = {"defense": "abl", "abl": abl, **facts}
        else:
            model = train_classifier(images, labels, c.classifier, self.num_classes)
        save_classifier(path, model, c.classifier, attack=attack, poisoned=len(chosen), **extra)

    def stage_classifier(self) -> None:
        if self.user_classifier is not None:
            self.check_given_classifier()
            return
        self._train_classifier(self.config.attack_config, self.classifier_path)

    def check_given_classifier(self) -> None:
        """The given classifier against the labelled calibration split, before any stage builds on it: as many
        outputs as the data has classes, and clearly better than chance. A model fed other inputs than it was
        trained on (a normalisation left out, another size, the classes in another order) scores near chance and
        would give a bundle that guards nothing; refused here with the likely causes, not found stages later."""
        model = self.load_classifier(self.user_classifier)  # type: ignore[arg-type]  # checked by the caller
        labels = self.dataset.calibration.labels
        logits, _ = predict(model, self.x_cal)
        classes = self.num_classes
        if logits.shape[1] != classes:
            raise ValueError(
                f"{self.user_classifier} gives {logits.shape[1]} outputs; the data has {classes} classes "
                f"({', '.join(self.dataset.class_names)}): one output per class, in the classes' order"
            )
        accuracy = float((logits.argmax(1) == labels).mean())
        chance = 1 / classes
        floor = chance + MIN_GAIN_OVER_CHANCE * (1 - chance)
        if not accuracy >= floor:
            raise ValueError(
                f"{self.user_classifier} labels {accuracy:.1%} of the {len(labels)} calibration images right (chance "
                f"{chance:.1%}; at least {floor:.1%} needed): it is likely fed other inputs than it was trained on. "
                "Check --mean/--std (its own normalisation), --size/--color, and that the class folders sort in the "
                f"order of its outputs ({', '.join(self.dataset.class_names)})"
            )
        log.info("using the given classifier %s (%.1f%% of the calibration images right); nothing to train",
                 self.user_classifier, 100 * accuracy)  # fmt: skip

    def stage_masked_ae(self) -> None:
        self._autoencoder("masked-ae", self.config.masked_ae, train_masked)

    def stage_detrigger_ae(self) -> None:
        self._autoencoder("detrigger-ae", self.config.detrigger, train_detrigger)

    def _neural_cleanse(self, classifier: Path) -> NeuralCleanseResult:
        model = self.load_classifier(classifier)
        cal = self.dataset.calibration
        return run_neural_cleanse(model, self.x_cal, cal.labels, self.num_classes, self.config.neural_cleanse)

    def stage_neural_cleanse(self) -> None:
        result = self._neural_cleanse(self.classifier_path)
        result.save(self.work / "neural_cleanse.npz")
        log.info("anomaly index %s, flagged %s", result.anomaly_index.round(2).tolist(), result.flagged_labels)

    def derived_path(self, name: str) -> Path:
        """Where a model derived from the classifier (repaired_classifier, backdoor_expert) is kept: a .pt2
        archive for a user's archive, else our checkpoint."""
        return self.work / (name + (".pt2" if self.classifier_path.suffix == ".pt2" else ".pt"))

    @property
    def repaired_path(self) -> Path:
        return self.derived_path("repaired_classifier")

    def _save_derived(self, name: str, model: torch.nn.Module, facts: dict[str, object]) -> None:
        """Save a fine-tuned copy of the classifier the way the classifier came: a user's archive is exported
        again as an archive; our checkpoint keeps the original's architecture and config. Either is saved without
        the contract's normalisation, as the classifier came (loading puts it back in front)."""
        path = self.derived_path(name)
        model = unwrap(model)
        if path.suffix == ".pt2":
            batch = torch.export.Dim("batch")
            example = torch.from_numpy(self.x_cal[:2])  # the shape the model takes; values do not matter
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(path))
            write_json(path.with_suffix(".json"), facts)
        else:
            meta, _ = load_checkpoint(self.classifier_path)
            shape = meta.get("input_shape", list(self.contract.chw))
            save_checkpoint(
                path, model, meta["arch"], meta["config"], num_classes=meta["num_classes"], input_shape=shape, **facts
            )

    def repaired(
        self, config: RepairConfig, classifier: Path | None = None, reversed_triggers: Path | None = None
    ) -> tuple[torch.nn.Module, dict[str, float]]:
        """A copy of the classifier (or of `classifier`) fine-pruned and unlearned by `config` on clean data (the
        bank and the repair share), with Neural Cleanse's result in the work folder (or `reversed_triggers`)."""
        model = self.load_classifier(classifier or self.classifier_path)
        nc = NeuralCleanseResult.load(reversed_triggers or self.work / "neural_cleanse.npz")
        idx = repair_indices(len(self.x_cal), self.config.calibration)
        labels = suspects(nc.l1_norms, nc.flagged_labels, config.unlearn_labels)
        log.info("unlearning the reversed triggers of labels %s", labels)
        y = self.dataset.calibration.labels[idx]
        return repair(model, self.x_cal[idx], y, nc.masks[labels], nc.patterns[labels], config)

    def stage_repair(self) -> None:
        """Fine-prune and unlearn a copy of the classifier on clean data (the bank and the repair share)."""
        model, facts = self.repaired(self.config.repair)
        self._save_derived("repaired_classifier", model, {"repair": self.config.repair, **facts})

    def stage_expert(self) -> None:
        """Fine-tune a copy of the classifier on mislabelled clean data (the bank and the repair share) into a
        backdoor expert (training.expert)."""
        model = self.load_classifier(self.classifier_path)
        idx = repair_indices(len(self.x_cal), self.config.calibration)
        y = self.dataset.calibration.labels[idx]
        model, facts = train_expert(model, self.x_cal[idx], y, self.num_classes, self.config.expert)
        self._save_derived("backdoor_expert", model, {"expert": self.config.expert, **facts})

    def _references(self, files: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The files the bundle's signals fit on clean data (Signal.reference), from the exported classifier and
        the calibration images no threshold is fitted on (the STRIP bank and the repair share)."""
        from service.signals import REGISTRY

        idx = repair_indices(len(self.x_cal), self.config.calibration)
        session = ort.InferenceSession(str(self.out / files["classifier"]["path"]), providers=["CPUExecutionProvider"])

        def classify(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            logits, features = session.run(["logits", "features"], {"images": images})
            return logits, features

        out, labels = {}, self.dataset.calibration.labels[idx]
        for name in signal_params(files, self.config.calibration):
            signal = REGISTRY[name]
            if signal.reference is not None:
                path = self.out / f"{signal.reference}.npz"
                signal.fit_reference(classify, self.x_cal[idx], labels, self.num_classes, path)
                out[signal.reference] = {"path": path.name, "sha256": sha256_file(path)}
        return out

    def stage_export(self) -> None:
        cfg = self.config.export
        example = (torch.from_numpy(self.x_cal[: cfg.parity_images]),)
        classifier = self.load_classifier(self.classifier_path)
        channels, height, width = self.contract.chw
        # Built from their own checkpoints' configs: reused autoencoders may have been trained with other settings.
        det_meta, det_state = load_checkpoint(self.work / "detrigger_ae.pt")
        detrigger = DetriggerAE(det_meta["config"]["width"], channels)
        detrigger.load_state_dict(det_state)
        masked_meta, masked_state = load_checkpoint(self.work / "masked_ae.pt")
        masked = MaskedAE(masked_meta["config"]["width"], channels)
        masked.load_state_dict(masked_state)
        patch, sharpen = masked_meta["config"]["patch"], masked_meta["config"]["sharpen"]
        restorer = MaskedRestorer(masked, patch, sharpen, height, width)
        nc = NeuralCleanseResult.load(self.work / "neural_cleanse.npz")
        stamper = ReversedTriggers(nc.masks, nc.patterns)
        label = torch.tensor([nc.flagged_labels[0] if nc.flagged_labels else 0])
        self.out.mkdir(parents=True, exist_ok=True)
        images, restored = ["images"], ["restored"]
        derived = {name: self.derived_path(name) for name in DERIVED_MODELS if self.derived_path(name).is_file()}
        files = {
            "classifier": export_onnx(
                classifier, example, self.out / "classifier.onnx", images, ["logits", "features"], cfg
            ),
            **{
                name: export_onnx(
                    self.load_classifier(path),
                    example,
                    self.out / f"{name}.onnx",
                    images,
                    ["logits", "features"],
                    cfg,
                )
                for name, path in derived.items()
            },
            "detrigger_ae": export_onnx(detrigger, example, self.out / "detrigger_ae.onnx", images, restored, cfg),
            "masked_ae": export_onnx(restorer, example, self.out / "masked_ae.onnx", images, restored, cfg),
            "reversed_triggers": export_onnx(
                stamper, (*example, label), self.out / "reversed_triggers.onnx", ["images", "label"], ["stamped"], cfg
            ),
        }
        bank_idx, _, _ = split_calibration(len(self.x_cal), self.config.calibration)
        files["strip_bank"] = write_bank(self.out / "strip_bank.npy", self.x_cal[bank_idx])
        files.update(self._references(files))
        # The PyTorch sources ride along (small) so that anyone can repeat the parity check or fine-tune.
        sources = {
            "classifier": self.classifier_path,
            **derived,
            "detrigger_ae": self.work / "detrigger_ae.pt",
            "masked_ae": self.work / "masked_ae.pt",
            "reversed_triggers": self.work / "neural_cleanse.npz",
        }
        checkpoints = copy_checkpoints(self.out / "checkpoints", sources)
        c = self.config
        update_manifest(
            self.out,
            drop=("thresholds", "calibration"),  # fitted to the models this export replaces
            schema_version=1,
            name=f"{self.dataset.name}-{self.classifier_path.stem if self.user_classifier else c.attack}",
            dataset=self.dataset.name,
            class_names=list(self.dataset.class_names),
            preprocessing=self.contract.to_dict(),
            files=files,
            checkpoints=checkpoints,
            neural_cleanse=nc.summary(),
            signals=signal_params(files, self.config.calibration),
            configs=to_jsonable(
                {
                    "attack": c.attack_config if self.user_classifier is None else None,
                    "attack_preset": c.attack if self.user_classifier is None else None,
                    "data": c.data,
                    "classifier": c.classifier,
                    "masked_ae": masked_meta["config"],
                    "detrigger": det_meta["config"],
                    "neural_cleanse": c.neural_cleanse,
                    "repair": c.repair,
                    "expert": c.expert,
                    "calibration": c.calibration,
                    "export": c.export,
                    "strip": {"n": c.calibration.strip_n, "blend": c.calibration.strip_blend},
                    "limits": {
                        "train": c.train_limit,
                        "calibration": c.calibration_limit,
                        "test": c.test_limit,
                    },
                }
            ),
            build={
                "command": " ".join(["python -m training", *sys.argv[1:]]),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
        )

    def stage_calibrate(self) -> None:
        # The old thresholds go first: they may not hold for what is being calibrated now (another STRIP N is
        # refused by the manifest check), and until the new ones are written the bundle serves nothing.
        update_manifest(self.out, drop=("thresholds",))
        bundle = Bundle.load(self.out)
        c = self.config.calibration
        thresholds, stand_in = calibrate(bundle, self.x_cal, self.dataset.calibration.labels, c)
        # STRIP runs at the N it was calibrated at: the manifest says so wherever it names it
        strip = {"n": c.strip_n, "blend": c.strip_blend}
        m = bundle.manifest
        signals = {k: ({**v, **strip} if k == "strip" else v) for k, v in m.get("signals", {}).items()}
        configs = {**m.get("configs", {}), "strip": strip, "calibration": to_jsonable(c)}
        sections: dict[str, Any] = {"thresholds": thresholds, "calibration": stand_in, "configs": configs}
        if "signals" in m:  # bundles from before the list run the default signals
            sections["signals"] = signals
        update_manifest(self.out, **sections)
        log.info("thresholds: %s", {k: v.get("threshold") for k, v in thresholds.items() if isinstance(v, dict)})

    def stage_metrics(self) -> None:
        """Our demo model: the attack it was trained with, against the bars. A user's model: what a defender can
        know (training.metrics.defender_metrics), and the trigger they know if they gave one."""
        bundle = Bundle.load(self.out)
        c = self.config
        if self.user_classifier is not None:
            probe = load_probe(c.probe_trigger, self.contract, c.probe_target) if c.probe_trigger else None
            metrics = defender_metrics(bundle, self.x_test, self.dataset.test.labels, probe)
            nc = NeuralCleanseResult.load(self.work / "neural_cleanse.npz")
            report.write_masks(self.out / report.MASKS_PNG, nc.masks, nc.patterns, nc.flagged_labels)
        else:
            metrics = evaluate(bundle, self.x_test, self.dataset.test.labels, c.attack_config)
        control = self.work / "control" / "summary.json"
        metrics["control"] = json.loads(control.read_text()) if control.is_file() else None
        metrics["stage_seconds"] = {
            **bundle.manifest.get("metrics", {}).get("stage_seconds", {}),
            **self.timings,
        }
        metrics["command"] = " ".join(["python -m training", *sys.argv[1:]])
        manifest = update_manifest(self.out, metrics=metrics)
        report.write(self.out / "report.md", manifest)

    def stage_control(self) -> None:
        """A model trained by the same recipe without poison: Neural Cleanse must flag nothing on it."""
        path = self.work / "control" / "classifier.pt"
        self._train_classifier(PRESETS["clean"], path)
        result = self._neural_cleanse(path)
        model = self.load_classifier(path)
        accuracy = float((predict(model, self.x_test)[0].argmax(1) == self.dataset.test.labels).mean())
        log.info(
            "control model: anomaly index %s, flagged %s",
            result.anomaly_index.round(2),
            result.flagged_labels,
        )
        write_json(self.work / "control" / "summary.json", {"clean_accuracy": accuracy, **result.summary()})
