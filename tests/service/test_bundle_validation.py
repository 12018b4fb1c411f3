"""The guard never fails open on a bad or edited manifest: every value checked at load, the root digest pinned,
and a score that is not a number fails the request instead of passing the image as clean."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app, load_bundle
from service.bundle import Bundle, BundleError, build_pipeline, sha256_file
from service.guard import DetriggerSignal, Fusion, GuardPipeline, NonFiniteScore, Prediction, Signal, SignalResult
from service.settings import Settings
from tests.conftest import MODELS, ROOT
from tests.live import free_port, run_service
from tests.service.conftest import files, png, wait_ready

SHIPPED = json.loads((MODELS / "manifest.json").read_text())
SHIPPED_BANK = np.load(MODELS / SHIPPED["files"]["strip_bank"]["path"])  # float32 (M, 1, 28, 28) clean images
FUSED = SHIPPED["thresholds"]["fused"]
NAN, INF = math.nan, math.inf


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """The shipped bundle's manifest and the files it lists (not the training checkpoints), in tmp_path."""
    copy = tmp_path / "models"
    copy.mkdir()
    for name in ["manifest.json", *(entry["path"] for entry in SHIPPED["files"].values())]:
        shutil.copy(MODELS / name, copy / name)
    return copy


def put(root: Path, where: str, value: Any) -> None:
    """Set the manifest's value at a dotted path ("thresholds.fused.levels.4"); json writes NaN as NaN."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    *parents, last = where.split(".")
    node = manifest
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    path.write_text(json.dumps(manifest, indent=2))


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", *args], env={**os.environ, **env}, cwd=ROOT,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def exit_of(env: dict[str, str]) -> tuple[int, str]:
    """Start the service; (exit status, output) once it stops, killed if it is still up after 60 s."""
    proc = run_service({"GUARD_HOST": "127.0.0.1", "GUARD_PORT": str(free_port()), **env})
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # it started: the refusal this test wants did not happen
        proc.kill()
        output, _ = proc.communicate()
    return proc.returncode, output


def refusal(root: Path, **kw: Any) -> str:
    """Bundle.load's one-line BundleError on this bundle."""
    with pytest.raises(BundleError) as caught:
        Bundle.load(root, **kw)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# (dotted path edited, value written, the field the one-line error must name)
BAD_EDITS = [
    ("thresholds.fused.threshold", NAN, "thresholds.fused.threshold"),
    ("thresholds.fused.threshold", INF, "thresholds.fused.threshold"),
    ("thresholds.fused.threshold", 1.5, "thresholds.fused.threshold"),
    ("thresholds.fused.threshold", 1.0, "thresholds.fused.threshold"),  # no fused score in [0, 1] passes it
    ("thresholds.fused.threshold", -0.1, "thresholds.fused.threshold"),
    ("thresholds.expert.threshold", NAN, "thresholds.expert.threshold"),
    ("thresholds.expert.threshold", 0.5, "thresholds.expert.threshold"),  # a log-probability: <= 0
    ("thresholds.activation.threshold", NAN, "thresholds.activation.threshold"),
    ("thresholds.activation.threshold", INF, "thresholds.activation.threshold"),
    ("thresholds.activation.threshold", "5.6", "thresholds.activation.threshold"),
    ("thresholds.target_fpr", 0.0, "thresholds.target_fpr"),
    ("thresholds.fused.levels.4", FUSED["levels"][2], "thresholds.fused.levels"),  # not increasing
    ("thresholds.fused.levels.90", 1.0, "thresholds.fused.levels"),  # the tail starts below 1
    ("thresholds.fused.quantiles.expert.5", FUSED["quantiles"]["expert"][4] - 1.0, "thresholds.fused.quantiles.expert"),
    ("thresholds.fused.quantiles.detrigger", FUSED["quantiles"]["detrigger"][:-1], "thresholds.fused.quantiles"),
    ("thresholds.fused.quantiles.mahalanobis.3", NAN, "thresholds.fused.quantiles.mahalanobis[3]"),
    ("thresholds.fused.quantiles", {k: FUSED["quantiles"][k] for k in ("detrigger", "expert")}, "fused.quantiles"),
    ("thresholds.fused.tail_scale.expert", -0.2, "thresholds.fused.tail_scale.expert"),
    ("thresholds.fused.tail_scale.mahalanobis", 1e300, "thresholds.fused.tail_scale.mahalanobis"),
    # a tail wide enough to mute the signal: past TAIL_REACH times its table's largest score
    ("thresholds.fused.tail_scale.mahalanobis", 11 * FUSED["quantiles"]["mahalanobis"][-1], "tail_scale.mahalanobis"),
    ("thresholds.activation.threshold", 10**400, "thresholds.activation.threshold"),  # past float's range
    ("thresholds.fused.quantiles.expert.90", 0.5, "thresholds.fused.quantiles.expert"),  # a log-probability: <= 0
    ("thresholds.fused.quantiles.repaired.0", -1.0, "thresholds.fused.quantiles.repaired"),  # a divergence: >= 0
    ("thresholds.fused.quantiles.detrigger.90", 1.5, "thresholds.fused.quantiles.detrigger"),  # a drop: <= 1
    ("thresholds.fused.rule", "mean", "thresholds.fused.rule"),
    ("thresholds.fused.tail_scale.activation", 0, "thresholds.fused.tail_scale.activation"),
    ("class_names", SHIPPED["class_names"][:9], "class_names"),
    ("class_names.9", "Bag", "class_names"),  # two classes with one name
    ("configs.strip.n", 257, "configs.strip.n"),  # the bank holds 256
    ("configs.strip.n", 0, "configs.strip.n"),
    ("configs.strip.blend", "max", "configs.strip.blend"),
    ("thresholds.repaired.score", "drop", "thresholds.repaired.score"),  # fitted to the legacy score
    ("signals.repaired.score", "drop", "thresholds.repaired.score"),
    ("signals.repaired.score", "kl", "signals.repaired.score"),
    ("signals.repaired", "jeffreys", "signals.repaired"),
    ("thresholds.repaired.threshold", -0.5, "thresholds.repaired.threshold"),  # a divergence: >= 0
    ("neural_cleanse.activation_neurons.0", [155, 200], "neural_cleanse.activation_neurons"),  # 200 features
    ("neural_cleanse.activation_neurons.0", [], "neural_cleanse.activation_neurons"),
    ("neural_cleanse.activation_neurons", {"10": [155]}, "neural_cleanse.activation_neurons"),
    ("neural_cleanse.flagged_labels", [10], "neural_cleanse.flagged_labels"),
    ("neural_cleanse.flagged_labels", list(range(1, 10)), "neural_cleanse.flagged_labels"),  # no label left to give
    ("preprocessing.height", 32, "preprocessing.height"),  # the ONNX models take 28
    ("preprocessing.color", "RGB", "preprocessing.color"),
    ("preprocessing.resample", "smooth", "preprocessing.resample"),
    ("preprocessing.scale", 0, "preprocessing.scale"),
    ("preprocessing.scale", 1.0, "preprocessing.scale"),  # pixels in [0, 255]: every image past the clean tables
    ("preprocessing.scale", 1e-6, "preprocessing.scale"),  # every image near black: one label, never flagged
    ("preprocessing.layout", "NHWC", "preprocessing.layout"),
    ("preprocessing.std", [0.0], "preprocessing.std"),  # a division by zero in front of the classifier
    ("preprocessing.std", [NAN], "preprocessing.std"),
    ("preprocessing.mean", [0.1, 0.2], "preprocessing.mean"),  # one value per channel, or one for all
    ("preprocessing.gamma", 2.2, "preprocessing"),  # a key the service would not apply
    ("schema_version", 2, "schema_version"),
    ("name", "", "name"),
    ("files.classifier.outputs.0.shape", ["batch", 9], "files.classifier.outputs"),
    ("files.strip_bank.shape", [128, 1, 28, 28], "files.strip_bank.shape"),
    ("signals.telepathy", {}, "signals this service does not have: ['telepathy']"),
    ("signals", {}, "must include detrigger"),
    ("thresholds.repaired.threshold", NAN, "thresholds.repaired.threshold"),
    ("thresholds.label_source.source", "oracle", "thresholds.label_source.source"),
]


# The same for a bundle that runs STRIP (not the shipped default since make cost dropped it); a callable value is
# computed from that bundle's manifest.
STRIP_EDITS = [
    ("thresholds.strip.threshold", -INF, "thresholds.strip.threshold"),
    ("thresholds.strip.threshold", 3.33, "thresholds.strip.threshold"),  # above log2(10): every image flagged
    (
        "thresholds.fused.quantiles.strip.5",
        lambda m: m["thresholds"]["fused"]["quantiles"]["strip"][4] - 1.0,
        "thresholds.fused.quantiles.strip",
    ),
    ("thresholds.fused.quantiles.strip.3", NAN, "thresholds.fused.quantiles.strip[3]"),
    ("thresholds.strip.n", 12, "thresholds.strip.n"),  # calibrated at another N than the signal runs at
    ("signals.strip.n", 12, "thresholds.strip.n"),
    ("signals.strip.n", 4.0, "signals.strip.n"),  # not an integer, though int() would make one
    ("signals.strip.n", True, "signals.strip.n"),
    ("signals.strip.n", "4", "signals.strip.n"),
    ("signals.strip.blend", "mean", "thresholds.strip.blend"),  # calibrated with the sum
    ("signals.strip.blend", "bogus", "signals.strip.blend"),
    ("signals.strip.rounds", [2, 1], "signals.strip.rounds"),
]


@pytest.fixture
def strip_copy(bundle: Path, strip_bundle: Bundle) -> Path:
    """The copy, its manifest listing STRIP with thresholds calibrated for it (tests/conftest.py strip_bundle)."""
    (bundle / "manifest.json").write_text(json.dumps(strip_bundle.manifest, indent=2))
    return bundle


@pytest.mark.parametrize(("where", "value", "field"), BAD_EDITS, ids=[f"{w}={v!r}" for w, v, _ in BAD_EDITS])
def test_a_bad_manifest_value_is_refused_with_one_line_naming_it(
    bundle: Path, where: str, value: Any, field: str
) -> None:
    Bundle.load(bundle)  # the untouched copy loads
    put(bundle, where, value)
    assert field in refusal(bundle)


def test_a_fused_threshold_no_image_could_pass_is_refused(bundle: Path) -> None:
    """With only bounded signals (a drop in probability, a log-probability), tails so wide that both at their
    highest score fall short of the threshold's surprise: every image would be clean."""
    kept = ("detrigger", "expert")
    put(bundle, "signals", {name: {} for name in kept})
    put(bundle, "thresholds.fused.quantiles", {name: FUSED["quantiles"][name] for name in kept})
    put(bundle, "thresholds.fused.tail_scale", {name: FUSED["tail_scale"][name] for name in kept})
    put(bundle, "thresholds.label_source.source", "restored")  # no repaired signal to take labels from
    Bundle.load(bundle)  # as calibrated, the two can pass it
    put(bundle, "thresholds.fused.tail_scale", {name: 9.0 for name in kept})  # within TAIL_REACH of their tables
    assert "thresholds.fused.threshold" in (message := refusal(bundle)) and "cannot be exceeded" in message
    put(bundle, "thresholds.fused.tail_scale", {name: 1e3 for name in kept})  # past it: refused on its own
    assert "thresholds.fused.tail_scale.detrigger" in refusal(bundle)


def test_a_fused_threshold_override_of_1_is_refused() -> None:
    with pytest.raises(ValueError, match="fused_threshold"):
        Settings(fused_threshold=1.0)


@pytest.mark.data
@pytest.mark.parametrize(("where", "value", "field"), STRIP_EDITS, ids=[f"{w}={v!r}" for w, v, _ in STRIP_EDITS])
def test_a_bad_strip_value_is_refused_with_one_line_naming_it(
    strip_copy: Path, where: str, value: Any, field: str
) -> None:
    loaded = Bundle.load(strip_copy)  # the untouched copy loads, and runs STRIP
    assert "strip" in loaded.signal_names
    put(strip_copy, where, value(loaded.manifest) if callable(value) else value)
    assert field in refusal(strip_copy)


def test_a_signal_whose_reference_file_is_missing_or_wrong_is_refused(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["files"].pop("feature_gaussian")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "need file(s) ['feature_gaussian']" in refusal(bundle)
    manifest["files"]["feature_gaussian"] = entry
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    np.savez(bundle / entry["path"], means=np.zeros((9, 200), np.float32), precision=np.eye(200, dtype=np.float32))
    assert "feature_gaussian" in refusal(bundle)  # the file no longer has the digest the manifest records
    put(bundle, "files.feature_gaussian.sha256", sha256_file(bundle / entry["path"]))
    with pytest.raises(BundleError, match=r"means \[9, 200\] must be \[10, 200\]"):
        build_pipeline(Bundle.load(bundle))  # nine class means for ten classes


def test_a_precision_that_is_not_positive_definite_is_refused(bundle: Path) -> None:
    """A zero or negated precision gives every image a distance of 0 or less: the signal would never speak."""
    path = bundle / SHIPPED["files"]["feature_gaussian"]["path"]
    with np.load(path) as z:
        means, precision = z["means"], z["precision"]
    for bad in (np.zeros_like(precision), -precision, precision + np.triu(np.ones_like(precision), 1)):
        np.savez(path, means=means, precision=bad)
        put(bundle, "files.feature_gaussian.sha256", sha256_file(path))
        with pytest.raises(BundleError, match="symmetric positive definite"):
            build_pipeline(Bundle.load(bundle))


def test_a_model_listed_as_another_or_outside_the_bundle_is_refused(bundle: Path) -> None:
    """The repaired model or the expert as the classifier's own file would agree with it on every image, and their
    signals would never speak; a path out of the bundle's folder is not the bundle's."""
    classifier = SHIPPED["files"]["classifier"]
    for second in ("repaired_classifier", "backdoor_expert"):
        put(bundle, f"files.{second}", classifier)
        assert f"files.{second}: the same file as files.classifier" in refusal(bundle)
        put(bundle, f"files.{second}", SHIPPED["files"][second])
    Bundle.load(bundle)
    for path in ("../models/classifier.onnx", str(bundle / "classifier.onnx")):
        put(bundle, "files.classifier.path", path)
        assert "files.classifier" in (message := refusal(bundle)) and "leaves the bundle" in message


def test_a_fused_threshold_override_no_image_could_pass_stops_the_start(bundle: Path) -> None:
    """GUARD_FUSED_THRESHOLD is held to the same reachability check as the manifest's threshold."""
    from service.runtime import pipeline_for

    kept = ("detrigger", "expert")  # bounded scores only: the check can tell
    put(bundle, "signals", {name: {} for name in kept})
    put(bundle, "thresholds.fused.quantiles", {name: FUSED["quantiles"][name] for name in kept})
    put(bundle, "thresholds.fused.tail_scale", {name: 0.1 for name in kept})  # both at their highest: 1 - 2e-7
    put(bundle, "thresholds.label_source.source", "restored")
    loaded = Bundle.load(bundle)
    assert pipeline_for(Settings(fused_threshold=0.99), loaded).fusion.threshold == 0.99
    with pytest.raises(ValueError, match=r"GUARD_FUSED_THRESHOLD: 0\.9999999999 cannot be exceeded"):
        pipeline_for(Settings(fused_threshold=0.9999999999), loaded)


def test_a_signal_whose_model_is_missing_is_refused(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]["repaired_classifier"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "need model(s) ['repaired_classifier']" in refusal(bundle)


def test_every_problem_is_reported_at_once(bundle: Path) -> None:
    put(bundle, "thresholds.fused.threshold", 2.0)
    put(bundle, "configs.strip.blend", "max")
    message = refusal(bundle)
    assert "thresholds.fused.threshold: 2.0" in message and "configs.strip.blend: " in message
    assert message.count("; ") == 1


def test_a_bundle_from_before_the_repaired_score_runs_the_drop_it_was_calibrated_with(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["signals"]["repaired"]["score"], manifest["thresholds"]["repaired"]["score"]
    manifest["thresholds"]["repaired"]["threshold"] = 0.5
    (bundle / "manifest.json").write_text(json.dumps(manifest))

    repaired = next(s for s in build_pipeline(Bundle.load(bundle)).signals if s.name == "repaired")
    assert repaired.score == "drop" and repaired.threshold == 0.5  # type: ignore[attr-defined]
    put(bundle, "thresholds.repaired.threshold", 2.0)  # a drop lies in [-1, 1]
    assert "thresholds.repaired.threshold" in refusal(bundle)


def test_an_uncalibrated_bundle_still_loads_for_calibration(bundle: Path) -> None:
    """Calibration loads the bundle before it has thresholds; the service then refuses it (Runtime.build)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["thresholds"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert Bundle.load(bundle).manifest.keys() == manifest.keys()


@pytest.mark.slow
def test_verify_refuses_a_nan_threshold_with_one_line(bundle: Path) -> None:
    put(bundle, "thresholds.fused.threshold", NAN)
    result = cli("verify", env={"GUARD_MODELS_DIR": str(bundle)})
    assert result.returncode == 1, result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "thresholds.fused.threshold is NaN" in result.stderr


@pytest.mark.slow
def test_the_service_does_not_start_on_a_nan_threshold(bundle: Path) -> None:
    put(bundle, "thresholds.fused.threshold", NAN)
    status, output = exit_of({"GUARD_MODELS_DIR": str(bundle)})
    assert status != 0, output
    assert "thresholds.fused.threshold is NaN" in output
    # One line and exit 1, not uvicorn's traceback and exit 3: `serve` loads the bundle before uvicorn starts.
    assert status == 1 and len(output.strip().splitlines()) == 1, output


# The root digest and its pin


@pytest.mark.slow
def test_the_service_does_not_start_when_the_pin_differs() -> None:
    pin = hashlib.sha256(b"another bundle's manifest").hexdigest()
    status, output = exit_of({"GUARD_BUNDLE_SHA256": pin})
    assert status == 1 and len(output.strip().splitlines()) == 1, output
    assert f"GUARD_BUNDLE_SHA256 pins {pin}" in output, output


def test_the_root_digest_is_the_sha256_of_the_manifest_bytes(bundle: Path) -> None:
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert Bundle.load(bundle, expected_digest=digest).digest == digest


def test_any_edit_of_the_manifest_breaks_the_pin(bundle: Path) -> None:
    path = bundle / "manifest.json"
    pinned = hashlib.sha256(path.read_bytes()).hexdigest()
    old = f'"clean_accuracy": {SHIPPED["metrics"]["classifier"]["clean_accuracy"]},'
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, old.replace("0.9161", "0.9162")))  # same length, same whitespace
    Bundle.load(bundle)  # a valid bundle, only not the pinned one
    message = refusal(bundle, expected_digest=pinned)
    assert pinned in message and hashlib.sha256(path.read_bytes()).hexdigest() in message


@pytest.mark.slow
def test_verify_prints_the_root_digest_and_honours_the_pin(bundle: Path) -> None:
    path = bundle / "manifest.json"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    env = {"GUARD_MODELS_DIR": str(bundle), "GUARD_BUNDLE_SHA256": digest}
    result = cli("verify", env=env)
    assert result.returncode == 0, result.stderr
    files = len(json.loads(path.read_text())["files"])  # the ONNX models and the STRIP bank
    assert digest in result.stdout and f"{files} files verified" in result.stdout
    path.write_text(path.read_text().replace('"dataset": "fashion-mnist"', '"dataset": "fashion-mnisT"'))
    result = cli("verify", env=env)
    # One line of refusal. Until service.app.load_bundle passes expected_digest, Runtime.build refuses after
    # the load has logged (INFO) that the files verified; then the refusal is the only line.
    refusals = [line for line in result.stderr.splitlines() if line.startswith("backdoor-guard:")]
    assert result.returncode == 1 and len(refusals) == 1, result.stderr
    assert f"GUARD_BUNDLE_SHA256 pins {digest}" in refusals[0] and result.stderr.endswith(refusals[0] + "\n")
    result = cli("verify", env={**env, "GUARD_BUNDLE_SHA256": digest.upper()})
    assert result.returncode == 2 and "GUARD_BUNDLE_SHA256" in result.stderr  # lowercase hex only


# The start-up self-test (service.selftest)


def blind(bundle: Path) -> None:
    """Tables that pass every range check but sit far above the clean scores: the guard goes half blind."""
    fused = json.loads(json.dumps(FUSED))
    for name in ("activation", "repaired", "mahalanobis"):  # unbounded scores: any table is in range
        fused["quantiles"][name] = [100 * v for v in fused["quantiles"][name]]
    fused["quantiles"]["detrigger"] = [min(1.0, v + 0.9) for v in fused["quantiles"]["detrigger"]]
    fused["quantiles"]["expert"] = [v / 100 for v in fused["quantiles"]["expert"]]  # log-probabilities near 0
    put(bundle, "thresholds.fused", fused)


def test_the_self_test_passes_the_shipped_bundle_and_catches_a_blinded_one(bundle: Path) -> None:
    from service.selftest import TOLERANCE, SelfTestFailed, self_test

    recorded = SHIPPED["calibration"]["neural_cleanse_reversed_triggers"]["0"]["fused_tpr"]
    guard = build_pipeline(Bundle.load(bundle))
    test = self_test(Bundle.load(bundle), lambda x: guard.run_in_chunks(x, 64))
    assert not test.problems and set(test.rates) == {"clean", "stand_in_0"}
    assert test.rates["stand_in_0"] >= recorded - TOLERANCE and test.rates["clean"] <= 0.01 + TOLERANCE
    blind(bundle)
    loaded = Bundle.load(bundle)  # every value in range
    guard = build_pipeline(loaded)
    test = self_test(loaded, lambda x: guard.run_in_chunks(x, 64))
    assert test.rates["stand_in_0"] < recorded - TOLERANCE
    with pytest.raises(SelfTestFailed, match=r"reversed trigger for label 0, calibration recorded 99\.6%"):
        test.check()
    put(bundle, "thresholds.fused", FUSED)
    put(bundle, "calibration", {})  # nothing recorded to test with: refused too
    loaded = Bundle.load(bundle)
    assert "records no stand-in" in " ".join(self_test(loaded, build_pipeline(loaded).run).problems)
    put(bundle, "calibration", {"neural_cleanse_reversed_triggers": {"0": {"fused_tpr": NAN}}})
    assert "fused_tpr is NaN" in refusal(bundle)  # it would pass any comparison: refused with every JSON NaN
    for record in ({"0": {"fused_tpr": 1.5}}, {"12": {"fused_tpr": 0.9}}, {"0": {}}, {"0": {"fused_tpr": "1"}}):
        put(bundle, "calibration", {"neural_cleanse_reversed_triggers": record})
        loaded = Bundle.load(bundle)
        problems = self_test(loaded, build_pipeline(loaded).run).problems
        assert problems and "not a label with a fused_tpr in [0, 1]" in problems[0]


def test_verify_and_the_service_refuse_a_guard_that_fails_its_self_test(bundle: Path) -> None:
    env = {"GUARD_MODELS_DIR": str(bundle)}
    result = cli("verify", env=env)
    assert result.returncode == 0 and "self-test flagged clean" in result.stdout and "stand_in_0" in result.stdout
    blind(bundle)
    result = cli("verify", env=env)
    assert result.returncode == 1 and "self-test failed" in result.stderr, result.stderr
    with TestClient(create_app(Settings(models_dir=bundle))) as c:
        deadline = time.monotonic() + 60
        while "self-test failed" not in (detail := c.get("/v2/health/ready").json().get("detail") or ""):
            assert time.monotonic() < deadline, detail
            time.sleep(0.05)
        assert c.get("/v2/health/ready").status_code == 503
        image = png((SHIPPED_BANK[0, 0] * 255).astype(np.uint8))
        assert c.post("/classify", files=files(image)).status_code == 503  # never served
        assert 'guard_self_test_flagged_ratio{probe="stand_in_0"}' in c.get("/metrics").text


# Fail closed at run time


class Fixed(Signal):
    """A signal that returns given scores: stands in for one that cannot score an image."""

    name = "fixed"

    def __init__(self, scores: list[float]) -> None:
        self.scores = np.array(scores)

    def evaluate(self, x: np.ndarray, extra: np.ndarray, original: Prediction, pred: Prediction) -> SignalResult:
        return SignalResult(self.scores, np.zeros(len(x), bool))


def uniform_classify(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((len(images), 3), np.float32), np.zeros((len(images), 4), np.float32)


def fusion(tail_scale: float = 1.0) -> Fusion:
    levels = np.array([0.0, 0.5, 0.9])
    tables = {"detrigger": np.array([-1.0, 0.0, 1.0]), "fixed": np.array([0.0, 1.0, 2.0])}
    return Fusion(levels, tables, {"detrigger": 1.0, "fixed": tail_scale}, threshold=0.95)


def guard(scores: list[float], fused: Fusion | None) -> GuardPipeline:
    return GuardPipeline(uniform_classify, [DetriggerSignal(lambda x: x), Fixed(scores)], fused)


X = np.zeros((3, 1, 2, 2), np.float32)


def test_finite_scores_get_a_verdict() -> None:
    result = guard([0.5, 3.0, 1.0], fusion()).run(X)
    # Reference: percentiles by hand. Fixed: 0.25, 1 - 0.1 exp(-1), 0.5; detrigger's drop 0 -> 0.5.
    np.testing.assert_allclose(result.score, [0.5, 1 - 0.1 * math.exp(-1), 0.5])
    assert result.backdoor.tolist() == [False, True, False]  # 0.963 > 0.95
    assert np.isnan(guard([0.5, 3.0, 1.0], None).run(X).score).all()  # uncalibrated: no fused score, by design


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_a_signal_that_cannot_score_an_image_fails_the_batch(bad: float) -> None:
    for fused in (fusion(), None):
        with pytest.raises(NonFiniteScore, match=r"fixed for image\(s\) \[1\]"):  # the service's 500 guard_failed
            guard([0.5, bad, 1.0], fused).run(X)


def test_a_fused_score_that_is_not_a_number_fails_the_batch() -> None:
    with pytest.raises(NonFiniteScore, match=r"fused for image\(s\) \[1\]"):
        guard([0.5, 3.0, 1.0], fusion(tail_scale=NAN)).run(X)  # only image 1 reaches the tail


class NaNOnWhite:
    """An ONNX Runtime session of the de-trigger AE that restores an all-white image to NaN."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        restored = self.session.run(outputs, feed)
        restored[0][(feed["images"] == 1).all(axis=(1, 2, 3))] = np.nan
        return restored

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def detrigger_nan_on_white(settings: Settings) -> Bundle:
    """The real bundle, but the de-trigger AE restores an all-white image to NaN: a signal it cannot compute. Both
    its sessions (`small`: batches of a few images) break alike."""
    bundle = load_bundle(settings)
    for sessions in (bundle.sessions, bundle.small):  # `small` is empty with a single ONNX Runtime thread
        if "detrigger_ae" in sessions:
            sessions["detrigger_ae"] = NaNOnWhite(sessions["detrigger_ae"])
    return bundle


def test_the_app_answers_500_not_a_clean_verdict_when_a_signal_fails() -> None:
    settings = Settings(models_dir=MODELS)
    with TestClient(create_app(settings, loader=detrigger_nan_on_white)) as client:
        wait_ready(client)  # the warm-up batch (bank images) has no white image
        white, clean = np.full((28, 28), 255, np.uint8), (SHIPPED_BANK[0, 0] * 255).round().astype(np.uint8)
        response = client.post("/classify", files=files(png(white)))
        assert response.status_code == 500, response.text
        assert response.json()["error"]["code"] == "guard_failed"
        response = client.post("/classify", files=files(png(clean)))  # the failure was the white image's alone
        assert response.status_code == 200 and response.json()["results"][0]["backdoor"] is False
        digest = hashlib.sha256((MODELS / "manifest.json").read_bytes()).hexdigest()
        meta = client.get(f"/v2/models/{SHIPPED['name']}").json()
        assert meta["bundle_sha256"] == digest and meta["sha256"] == SHIPPED["files"]["classifier"]["sha256"]
        assert f'bundle_sha256="{digest}"' in client.get("/metrics").text


@pytest.mark.data
def test_strip_without_its_recorded_n_is_held_to_the_calibration_config(strip_copy: Path) -> None:
    manifest = json.loads((strip_copy / "manifest.json").read_text())
    del manifest["thresholds"]["strip"]["n"]  # a bundle calibrated before N was recorded beside the threshold
    manifest["signals"]["strip"]["n"] = 1
    (strip_copy / "manifest.json").write_text(json.dumps(manifest))
    assert "configs.strip.n" in refusal(strip_copy)


@pytest.mark.data
def test_guard_strip_n_other_than_the_calibrated_n_stops_the_start(strip_bundle: Bundle) -> None:
    from service.runtime import pipeline_for

    calibrated = strip_bundle.manifest["thresholds"]["strip"]["n"]
    assert pipeline_for(Settings(strip_n=calibrated), strip_bundle).fusion is not None
    with pytest.raises(ValueError, match=f"calibrated at N = {calibrated}"):
        pipeline_for(Settings(strip_n=calibrated + 1), strip_bundle)


def test_squeeze_parameters_are_integers_in_range_and_those_it_was_calibrated_with() -> None:
    from service.signals.squeeze import SqueezeSignal

    assert SqueezeSignal.parameter_problems({"bits": 3, "median": 2}, {"bits": 3, "median": 2}) == []
    assert SqueezeSignal.parameter_problems({}, None) == []  # the defaults, before calibration
    assert "signals.squeeze.bits" in SqueezeSignal.parameter_problems({"bits": 3.0}, None)[0]
    assert "signals.squeeze.median" in SqueezeSignal.parameter_problems({"median": 1}, None)[0]
    assert "calibrated at 4" in SqueezeSignal.parameter_problems({"bits": 3}, {"bits": 4})[0]


def test_a_file_swapped_after_the_check_is_not_what_the_guard_runs(bundle: Path) -> None:
    """The files are read once, hashed and loaded from the same bytes: replacing one on disk after Bundle.load (the
    service builds its pipeline later, in its lifespan) changes nothing the guard computes."""
    loaded = Bundle.load(bundle)
    x = SHIPPED_BANK[:4]
    before = build_pipeline(loaded).run(x).signals["mahalanobis"].score
    gaussian = bundle / SHIPPED["files"]["feature_gaussian"]["path"]
    with np.load(gaussian) as z:
        np.savez(gaussian, means=z["means"], precision=np.zeros_like(z["precision"]))  # a dead signal
    np.save(bundle / SHIPPED["files"]["strip_bank"]["path"], np.zeros_like(SHIPPED_BANK))
    after = build_pipeline(loaded)
    np.testing.assert_array_equal(after.run(x).signals["mahalanobis"].score, before)
    assert (before > 0).all() and loaded.strip_bank.any()
    assert "feature_gaussian" in refusal(bundle)  # and a fresh load sees the swap
