"""The whole build on a tiny subset (`python -m training all --smoke`), then checks of what it wrote."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from service.bundle import Bundle, BundleError, build_pipeline, sha256_file
from service.preprocess import to_model_input
from tests.bundle_checks import REQUIRED_KEYS, parity_gaps
from training.__main__ import main
from training.classifier import KwonCNN

pytestmark = [pytest.mark.slow, pytest.mark.data]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("smoke")
    out, work = root / "bundle", root / "work"
    main(["all", "--smoke", "--out", str(out), "--work", str(work)])
    return out, work


def test_manifest_describes_every_file(smoke: tuple[Path, Path]) -> None:
    out, _ = smoke
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest) >= REQUIRED_KEYS
    files = manifest["files"]
    assert {"classifier", "detrigger_ae", "masked_ae", "reversed_triggers", "strip_bank"} <= set(files)
    for entry in [*files.values(), *manifest["checkpoints"].values()]:
        assert sha256_file(out / entry["path"]) == entry["sha256"]
    clf = files["classifier"]
    assert [i["name"] for i in clf["inputs"]] == ["images"]
    assert clf["inputs"][0]["shape"] == ["batch", 1, 28, 28]
    assert [(o["name"], o["shape"][1:]) for o in clf["outputs"]] == [("logits", [10]), ("features", [200])]
    assert manifest["preprocessing"]["height"] == 28 and manifest["preprocessing"]["layout"] == "NCHW"
    assert len(manifest["class_names"]) == 10
    nc = manifest["neural_cleanse"]
    assert len(nc["anomaly_index"]) == 10 and isinstance(nc["flagged_labels"], list)
    th = manifest["thresholds"]
    assert {"detrigger", "activation", "repaired", "expert", "mahalanobis", "fused"} <= set(th)
    assert "strip" not in th and "strip" not in manifest["signals"]  # off by default (make cost)
    assert "feature_gaussian" in files  # the mahalanobis signal's reference, fitted at export
    assert th["fused"]["rule"] == "fisher"
    assert th["target_fpr"] == 0.01 and manifest["configs"]["strip"]["n"] == 8  # where a bundle that lists it runs
    # the repaired signal's score is named where it runs and where its threshold was fitted
    assert manifest["signals"]["repaired"] == {"score": "jeffreys"} and th["repaired"]["score"] == "jeffreys"
    assert manifest["metrics"]["control"]["flagged_labels"] is not None
    assert (out / "report.md").read_text().startswith("# Guard bundle")


def test_onnx_matches_pytorch(smoke: tuple[Path, Path], fashion_mnist) -> None:
    out, _ = smoke
    images = to_model_input(fashion_mnist.test.images[:64])
    gaps = parity_gaps(out, images)
    assert set(gaps) == {
        "classifier", "repaired_classifier", "backdoor_expert", "detrigger_ae", "masked_ae", "reversed_triggers"
    }  # fmt: skip
    assert max(gaps.values()) <= 1e-4, gaps


def test_calibration_holds_on_its_own_data(smoke: tuple[Path, Path], fashion_mnist) -> None:
    """The fused threshold's FPR on the calibration half it was chosen on is the target, by construction."""
    out, _ = smoke
    fused = json.loads((out / "manifest.json").read_text())["thresholds"]["fused"]
    assert 0 <= fused["calibration_fpr"] <= 0.02
    assert len(fused["levels"]) == len(next(iter(fused["quantiles"].values())))


def test_tampered_or_missing_files_are_refused(smoke: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = smoke
    copy = tmp_path / "bundle"
    shutil.copytree(out, copy)
    Bundle.load(copy)  # intact: loads
    with (copy / "detrigger_ae.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"detrigger_ae.*SHA-256"):
        Bundle.load(copy)
    (copy / "detrigger_ae.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        Bundle.load(copy)


def test_guard_runs_on_the_smoke_bundle(smoke: tuple[Path, Path], fashion_mnist) -> None:
    out, _ = smoke
    guard = build_pipeline(Bundle.load(out))
    result = guard.run(to_model_input(fashion_mnist.test.images[:10]))
    assert result.score.shape == (10,) and np.isfinite(result.score).all()
    assert result.labels.shape == (10,) and result.restored_images.shape == (10, 1, 28, 28)


def test_a_users_torch_export_archive_can_be_guarded(smoke: tuple[Path, Path], tmp_path: Path) -> None:
    """Stages 6-9 take any classifier: here a .pt2 archive whose module returns (logits, features)."""
    _, work = smoke
    model = KwonCNN().eval()
    program = torch.export.export(
        model, (torch.rand(2, 1, 28, 28),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    archive = tmp_path / "users_model.pt2"
    torch.export.save(program, str(archive))
    shutil.copytree(work, tmp_path / "work", ignore=shutil.ignore_patterns("control", "classifier.*"))
    out = tmp_path / "bundle"
    for stage in ("neural-cleanse", "repair", "export", "calibrate"):
        main([stage, "--smoke", "--classifier", str(archive), "--out", str(out), "--work", str(tmp_path / "work")])
    manifest = json.loads((out / "manifest.json").read_text())
    assert (tmp_path / "work" / "repaired_classifier.pt2").is_file()  # repaired and saved as the user's kind
    assert "repaired_classifier" in manifest["files"] and "repaired" in manifest["signals"]
    assert manifest["name"] == "fashion-mnist-users_model"
    assert manifest["configs"]["attack"] is None  # the attack of a user's model is unknown
    assert "fused" in manifest["thresholds"]
    x = torch.rand(3, 1, 28, 28)
    logits = Bundle.load(out).classify(x.numpy())[0]
    np.testing.assert_allclose(logits, model(x)[0].detach().numpy(), atol=1e-4)


def test_a_fixed_batch_export_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    from training.classifier import load_classifier

    archive = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(KwonCNN().eval(), (torch.rand(2, 1, 28, 28),)), str(archive))
    with pytest.raises(ValueError, match="dynamic batch"):
        load_classifier(archive)
