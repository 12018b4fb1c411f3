"""Load a guard bundle (models/ + manifest.json), verifying every file's SHA-256 and every value the guard reads.

The bundle's identity is its root digest, the SHA-256 of manifest.json's exact bytes: the manifest lists every
file's SHA-256, so the root digest covers the whole bundle, thresholds and fusion tables included.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from service.guard import Fusion, GuardPipeline
from service.manifest import MANIFEST, BundleError, ModelIO, parse_manifest, show, signal_names, validate_manifest
from service.preprocess import Preprocessing

# BundleError and MANIFEST live in service.manifest; importing them from here keeps working.
__all__ = ["MANIFEST", "Bundle", "BundleError", "build_pipeline", "check_digest", "providers", "read_manifest",
           "sha256_file", "verify_files"]  # fmt: skip

log = logging.getLogger(__name__)
ONNX_MODELS = ("classifier", "detrigger_ae", "masked_ae", "reversed_triggers")  # every bundle has these
OPTIONAL_MODELS = ("repaired_classifier", "backdoor_expert")  # made by the repair and expert stages


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    return parse_manifest(manifest_bytes(root), root / MANIFEST)


def manifest_bytes(root: Path) -> bytes:
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"no {MANIFEST} in {root}: build a bundle with `python -m training all --out {root}`")
    return path.read_bytes()


def check_digest(digest: str, expected: str | None) -> None:
    """Refuse a bundle whose root digest is not the pinned one (GUARD_BUNDLE_SHA256)."""
    if expected is not None and digest != expected:
        raise BundleError(
            f"{MANIFEST} has SHA-256 {digest}, GUARD_BUNDLE_SHA256 pins {expected}: "
            "the manifest (thresholds, tables or a file's digest) is not the pinned bundle's"
        )


def verify_files(root: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Every file the manifest lists exists under root and hashes to its recorded SHA-256: name -> its bytes, read
    once, so that what is loaded is what was hashed (a file swapped after the check cannot get in)."""
    problems, verified = [], {}
    for name, entry in manifest.get("files", {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or "sha256" not in entry:
            problems.append(f"files.{name}: {show(entry)}, must give the file's path and sha256")
            continue
        if PurePosixPath(entry["path"]).is_absolute() or ".." in PurePosixPath(entry["path"]).parts:
            problems.append(f"files.{name}: {show(entry['path'])} leaves the bundle; paths are relative to {root}")
            continue
        path = root / entry["path"]
        if not path.is_file():
            problems.append(f"{name}: {path} is missing")
            continue
        data = path.read_bytes()
        if (digest := hashlib.sha256(data).hexdigest()) != entry["sha256"]:
            problems.append(f"{name}: {path} has SHA-256 {digest}, manifest says {entry['sha256']}")
        verified[name] = data
    # The classifier and its second opinions are different models by construction: one listed twice (the same
    # bytes) would answer exactly as the classifier does, and its signal would never speak
    models = [n for n in ("classifier", *OPTIONAL_MODELS) if n in verified]
    for i, a in enumerate(models):
        problems += [f"files.{b}: the same file as files.{a}" for b in models[i + 1 :] if verified[a] == verified[b]]
    if problems:
        raise BundleError("refusing to load an unverified bundle: " + "; ".join(problems))
    return verified


def providers(prefer_gpu: bool = True) -> list[str]:
    """CUDA when onnxruntime-gpu sees a GPU, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = ["CUDAExecutionProvider"] if prefer_gpu and "CUDAExecutionProvider" in available else []
    return [*chosen, "CPUExecutionProvider"]


def half_threads(threads: int) -> int:
    """Intra-op threads of each `Bundle.small` session: half those of the others (`threads`; 0 = all the cores this
    process may run on). On small batches the guard runs two models at a time (GuardPipeline's side thread); 0
    where the others have a single thread: two models at a time would then take two cores where one was given."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return (threads or cores) // 2


@dataclass
class Bundle:
    """The verified bundle: ONNX Runtime sessions plus the arrays and settings the guard needs."""

    root: Path
    manifest: dict[str, Any]
    sessions: dict[str, Any]  # name -> onnxruntime.InferenceSession
    strip_bank: np.ndarray  # float32 (M, C, H, W) clean calibration images
    digest: str  # the root digest: SHA-256 (hex) of manifest.json's bytes, which list every file's SHA-256
    # The manifest's other files (name -> bytes; not the ONNX models or the bank, loaded above) as hashed at load:
    # read them from here (a signal's reference), never from the path again
    verified: dict[str, bytes]
    # the same models as `sessions`, as sessions of `half_threads` intra-op threads: small batches run two at a time
    # (none where `sessions` have a single thread: no twin, every batch on `sessions`)
    small: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path, threads: int = 0, prefer_gpu: bool = True, expected_digest: str | None = None) -> Bundle:
        """Verify and open the bundle; expected_digest (GUARD_BUNDLE_SHA256) pins its root digest."""
        import onnxruntime as ort

        root = Path(root)
        raw = manifest_bytes(root)  # hashed and parsed from the same bytes: no window to swap the file between
        digest = hashlib.sha256(raw).hexdigest()
        check_digest(digest, expected_digest)
        manifest = parse_manifest(raw, root / MANIFEST)
        files = manifest.get("files")
        missing = [n for n in (*ONNX_MODELS, "strip_bank") if not isinstance(files, dict) or n not in files]
        if missing:
            raise BundleError(f"{root / MANIFEST} lists no {', '.join(missing)}")
        verified = verify_files(root, manifest)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0 = ONNX Runtime's default (all cores)
        options.inter_op_num_threads = 1
        # Spinning intra-op threads keep both cores busy between runs and starve the event loop that
        # parses the next requests; without spinning, batches fill while the previous one computes.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chosen = providers(prefer_gpu)
        sessions = {
            name: ort.InferenceSession(verified[name], options, providers=chosen)
            for name in (*ONNX_MODELS, *(m for m in OPTIONAL_MODELS if m in manifest["files"]))
        }
        small = {}
        if half := half_threads(threads):
            options.intra_op_num_threads = half
            small = {name: ort.InferenceSession(verified[name], options, providers=chosen) for name in sessions}
        bank = np.load(io.BytesIO(verified["strip_bank"]), allow_pickle=False)
        validate_manifest(manifest, {name: ModelIO.of(session) for name, session in sessions.items()}, bank)
        log.info(
            "bundle %s (root digest %s) verified; ONNX Runtime providers %s",
            root, digest, sessions["classifier"].get_providers(),
        )  # fmt: skip
        loaded = {*sessions, "strip_bank"}  # already in memory as sessions and the bank: not kept twice
        rest = {name: data for name, data in verified.items() if name not in loaded}
        return cls(root, manifest, sessions, bank.astype(np.float32), digest, rest, small)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(**self.manifest["preprocessing"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    def classify(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (N, 1, H, W) -> logits (N, C), features (N, D)."""
        return self.classifier("classifier")(images)

    def classifier(self, name: str) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """The classifier `name` ("classifier", "repaired_classifier", "backdoor_expert") as images -> (logits,
        features)."""
        session = self.sessions[name]

        def classify(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            logits, features = session.run(["logits", "features"], {"images": images})
            return logits, features

        return classify

    @property
    def signal_names(self) -> list[str]:
        """The signals this bundle runs, in order: the manifest's `signals`, or the four every bundle had."""
        return signal_names(self.manifest)

    def image_model(self, name: str) -> Callable[[np.ndarray], np.ndarray]:
        session = self.sessions[name]
        return lambda images: session.run(["restored"], {"images": images})[0]

    def stamp_reversed(self, images: np.ndarray, label: int) -> np.ndarray:
        """Stamp Neural Cleanse's reversed trigger for `label` onto float32 (N, C, H, W) images."""
        feed = {"images": images, "label": np.array([label], np.int64)}
        return self.sessions["reversed_triggers"].run(["stamped"], feed)[0]


def build_pipeline(
    bundle: Bundle,
    strip_n: int | None = None,
    calibrated: bool = True,
    avoid_infected: bool = True,
    signals: list[str] | None = None,
    early_exit: bool = True,
    small: bool = True,
) -> GuardPipeline:
    """The guard over a bundle. calibrated=False leaves thresholds out (calibration itself needs that);
    avoid_infected=False gives suspected images their source's label, even an infected one; `signals` runs a
    subset of the bundle's signals (uncalibrated only: the fusion tables are fitted to the full set);
    early_exit=False runs all N STRIP overlays on every image (the same verdicts; exact STRIP evidence, which the
    evaluation's per-signal figures need); small=False runs every batch as the large ones run, with no `small` twin
    over Bundle.small's sessions for batches of at most SIDE_MAX_IMAGES images (the same results)."""
    from service.signals import REGISTRY

    names = bundle.signal_names if signals is None else signals
    if signals is not None and calibrated and set(signals) != set(bundle.signal_names):
        raise ValueError("a subset of the signals has no calibrated fusion: build it with calibrated=False")
    thresholds = bundle.manifest.get("thresholds", {}) if calibrated else {}
    params = dict(bundle.manifest.get("signals", {}))
    if strip_n is not None:
        params["strip"] = {**params.get("strip", {}), "n": strip_n}
    fusion = Fusion.from_manifest(thresholds["fused"]) if "fused" in thresholds else None
    infected = bundle.manifest["neural_cleanse"]["flagged_labels"] if avoid_infected else []
    source = thresholds.get("label_source", {}).get("source", "restored")  # chosen at calibration
    if "repaired" not in names:
        source = "restored"

    def guard(sessions: Bundle, side_thread: bool, twin: GuardPipeline | None) -> GuardPipeline:
        built = [
            REGISTRY[name].from_bundle(sessions, params.get(name, {}), thresholds.get(name, {}).get("threshold"))
            for name in names
        ]
        models = {s.model: sessions.classifier(s.model) for s in built if s.model != "classifier"}
        return GuardPipeline(
            sessions.classify, built, fusion, infected, models=models, source=source, early_exit=early_exit,
            side_thread=side_thread, small=twin,
        )  # fmt: skip

    # small batches: the same guard over the half-core sessions, two models at a time
    twin = guard(replace(bundle, sessions=bundle.small, small={}), True, None) if small and bundle.small else None
    return guard(bundle, False, twin)
