"""The suite's definition, its cache keys, the as-sent transforms and the bar check (no training here)."""

import json
from dataclasses import replace

import numpy as np
import pytest

from service.preprocess import Preprocessing
from training.attacks import PRESETS
from training.classifier import ARCHS
from training.metrics import Outcome, TriggeredSet
from training.suite import (
    ADDED_LATER,
    AS_SENT,
    SELECTION_START,
    SUITE,
    as_sent,
    bars,
    config_of,
    misses,
    selection,
    stage_key,
    which_test_images,
)


def test_suite_covers_every_family_on_every_architecture() -> None:
    families = {"kwon", "checkerboard", "lowcontrast", "blend", "key", "sig", "wanet", "all_to_all", "clean"}
    assert families <= SUITE.keys()
    assert {e.arch for e in SUITE.values()} == set(ARCHS)  # the guard must assume no architecture
    assert all(e.preset in PRESETS for e in SUITE.values())
    modes = {PRESETS[e.preset].mode for e in SUITE.values()}
    assert modes == {"single-target", "all-to-all", "clean-label"}


def test_cache_keys_follow_what_each_stage_depends_on() -> None:
    config = config_of("wanet")
    assert config.classifier.arch == "kwon-cnn" and config.attack == "wanet"
    recalibrated = replace(config, calibration=replace(config.calibration, target_fpr=0.02))
    assert stage_key(recalibrated, "classifier") == stage_key(config, "classifier")  # calibration retrains nothing
    other_nc = replace(config, neural_cleanse=replace(config.neural_cleanse, steps=10))
    assert stage_key(other_nc, "classifier") == stage_key(config, "classifier")
    assert stage_key(other_nc, "neural-cleanse") != stage_key(config, "neural-cleanse")
    assert stage_key(other_nc, "repair") != stage_key(config, "repair")


def test_the_repairs_key_follows_the_calibration_images_it_fine_tunes_on() -> None:
    """The repair fine-tunes on the bank and the repair share (repair_indices): another seed, bank or share is
    another model, which a cached one would stand in for while overlapping the halves the thresholds are fitted
    on. At the values of the keys kept so far, the key is what it was (no cached repair goes stale)."""
    config = config_of("wanet")
    assert "repair_share" not in json.loads(stage_key(config, "repair"))
    for change in ({"seed": 1}, {"bank_size": 128}, {"repair_share": 0.2}):
        other = replace(config, calibration=replace(config.calibration, **change))
        assert stage_key(other, "repair") != stage_key(config, "repair"), change
        assert stage_key(other, "classifier") == stage_key(config, "classifier")
    other_fpr = replace(config, calibration=replace(config.calibration, target_fpr=0.02))
    assert stage_key(other_fpr, "repair") == stage_key(config, "repair")  # thresholds do not touch the repair


def test_repair_fields_added_later_count_only_away_from_their_former_value() -> None:
    """A key kept before `distill`/`mixup`/`tune_layers` existed has no such fields: a config at their former values
    (what the repair did then, and today's default) makes that same key, so its cached repair stays valid; any
    other value makes a new one and the repair is run again."""
    config = config_of("wanet")
    former = replace(config, repair=replace(config.repair, **ADDED_LATER["repair"]))
    key = json.loads(stage_key(former, "repair"))
    assert not ADDED_LATER["repair"].keys() & key["repair"].keys()
    assert stage_key(config, "repair") == stage_key(former, "repair")  # the default repairs as before
    for change in ({"distill": 0.5}, {"mixup": 0.2}, {"distill_temperature": 2.0}, {"tune_layers": 3}):
        other = replace(former, repair=replace(former.repair, **change))
        assert stage_key(other, "repair") != stage_key(former, "repair")
        assert stage_key(other, "classifier") == stage_key(former, "classifier")


def test_integer_upscaling_comes_back_through_the_service_preprocessing() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    contract = Preprocessing()
    assert contract.resample == "unscale"
    for variant in ("up2_nearest", "up3_nearest", "up3_bilinear"):
        np.testing.assert_array_equal(as_sent(pixels, variant, contract), pixels)
    # bilinear 2x: back to within the upscaler's 8-bit rounding (noise is the hardest case: most pixels exact)
    out = as_sent(pixels, "up2_bilinear", contract).astype(int)
    assert np.abs(out - pixels).max() <= 2 and (out == pixels).mean() > 0.6
    boxed = as_sent(pixels, "up2_bilinear", Preprocessing(resample="box")).astype(int)
    assert np.abs(boxed - pixels).mean() > 10  # what bundles built with "box" see: a blurred picture
    out = as_sent(pixels, "jpeg75", contract)
    assert out.shape == pixels.shape and out.dtype == np.uint8
    assert 0 < np.abs(out.astype(int) - pixels).mean() < 60  # changed, still the same picture
    assert set(AS_SENT) == {"up2_nearest", "up2_bilinear", "up3_nearest", "up3_bilinear", "jpeg75"}


def test_bars_report_each_goal_per_attack() -> None:
    def entry(tpr: float, fpr: float, asr: float, sent_tpr: float) -> dict:
        sent = {v: {"tpr": sent_tpr, "fpr": fpr, "attack_success_after": asr} for v in AS_SENT}
        return {"fused": {"tpr": tpr, "fpr": fpr}, "attack_success_after": asr, "clean_accuracy": 0.9,
                "clean_accuracy_guarded": 0.895, "as_sent": sent}  # fmt: skip

    rows = bars({"attacks": {"good": entry(0.99, 0.01, 0.01, 0.97), "bad": entry(0.90, 0.03, 0.05, 0.80)}})
    good, bad = rows
    assert all(good[k] for k in good if k not in ("attack", "worst_as_sent", "repaired_acc>=original-1pt"))
    assert not any(bad[k] for k in ("tpr>=95%", "fpr<=2%", "asr_after<=2%", "as_sent_within_5pt"))
    assert bad["clean_acc>=undefended-1pt"] and bad["worst_as_sent"]["tpr"] == 0.80
    assert good["repaired_acc>=original-1pt"] is None  # no repaired model: not applicable, not "met"
    repaired = {**entry(0.99, 0.01, 0.01, 0.97), "label_sources": {"repaired": {"clean_accuracy": 0.885}}}
    assert not bars({"attacks": {"r": repaired}})[0]["repaired_acc>=original-1pt"]  # 0.885 < 0.9 - 0.01


def test_misses_counts_where_the_attacker_still_wins_and_what_flagged_clean_images_lose() -> None:
    attack = PRESETS["kwon"]  # single target 0
    names = [f"c{i}" for i in range(3)]
    labels = np.array([0, 1, 1, 2, 2, 2])  # clean test images: 0 is the target, 1 and 2 the victims
    clean = {
        "original": np.array([0, 0, 1, 2, 2, 0]),  # the model calls one 1 and one 2 the target on its own
        "final": np.array([0, 2, 1, 2, 1, 0]),
        "backdoor": np.array([False, True, False, False, True, False]),  # flags a wrong one and a right one
    }
    trig = TriggeredSet(np.zeros((4, 1, 2, 2), np.float32), np.array([1, 1, 2, 2]), np.zeros(4, int))
    triggered = {
        "final": np.array([0, 1, 0, 0]),  # the attacker wins on three
        "backdoor": np.array([False, True, True, False]),
        "repaired.label": np.array([0, 1, 2, 1]),
    }
    m = misses(Outcome(clean, triggered, labels, trig, ["repaired"]), labels, attack, names)
    assert m["attacker_wins"] == 3 and m["attacker_wins_unflagged"] == 2
    assert m["attacker_wins_repaired_agrees"] == 1  # only the first: the repaired model says 0 there
    assert m["attacker_wins_by_true_label"] == {"c1": 1, "c2": 2}
    assert m["clean_given_attack_label"] == {"c1": 0.5, "c2": 1 / 3} and m["clean_given_attack_label_all"] == 0.4
    assert (m["clean_flagged"], m["clean_flagged_right_before"], m["clean_flagged_right_after"]) == (2, 1, 0)
    del triggered["repaired.label"]  # a bundle without the repaired model: not applicable, not 0
    assert (
        misses(Outcome(clean, triggered, labels, trig, []), labels, attack, names)["attacker_wins_repaired_agrees"]
        is None
    )


def test_as_sent_is_held_to_the_same_images_unaltered() -> None:
    sent = {v: {"tpr": 0.86, "fpr": 0.01, "attack_success_after": 0.02} for v in AS_SENT}
    entry = {"fused": {"tpr": 0.99, "fpr": 0.01}, "attack_success_after": 0.01, "clean_accuracy": 0.9,
             "clean_accuracy_guarded": 0.895, "as_sent": sent}  # fmt: skip
    assert not bars({"attacks": {"a": entry}})[0]["as_sent_within_5pt"]  # 13 points under all the test images
    entry["as_sent_baseline"] = {"tpr": 0.90, "fpr": 0.01, "attack_success_after": 0.015}
    assert bars({"attacks": {"a": entry}})[0]["as_sent_within_5pt"]  # 4 under the same 1000 images as they are


def test_choices_are_made_on_the_half_of_the_test_set_the_suite_does_not_report_on() -> None:
    assert selection(5000, 10000) == slice(SELECTION_START, SELECTION_START + 5000)
    with pytest.raises(ValueError, match="the test set has 10000"):
        selection(5001, 10000)
    assert which_test_images({"images": 5000, "first_image": SELECTION_START}).endswith("does not report on)")
    assert which_test_images({"images": 2000}) == "test images 0 to 1999"  # a report from before the split


def test_a_suite_bundle_is_current_only_with_the_checkpoints_its_work_folder_holds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A stage retrained since the export (its cache key changed: the attack, the data, Neural Cleanse's config)
    leaves a bundle calibrated on models no longer there: it is not current, and export and calibration run again.
    Here the shipped bundle stands in for a suite bundle, its own checkpoints for the work folder's."""
    import shutil
    from pathlib import Path

    from tests.conftest import MODELS
    from training.classifier import ClassifierConfig
    from training.pipeline import Builder
    from training.suite import _current

    manifest = json.loads((MODELS / "manifest.json").read_text())
    shutil.copytree(MODELS, tmp_path / "bundle")
    work = tmp_path / "work"
    work.mkdir()
    for name, file in (
        ("classifier", "classifier.pt"),
        ("repaired_classifier", "repaired_classifier.pt"),
        ("backdoor_expert", "backdoor_expert.pt"),
        ("reversed_triggers", "neural_cleanse.npz"),
    ):
        shutil.copy(MODELS / manifest["checkpoints"][name]["path"], work / file)  # fmt: skip
    config = replace(config_of("kwon"), classifier=ClassifierConfig(**manifest["configs"]["classifier"]))
    builder = Builder(config, tmp_path / "bundle", work)
    assert _current(builder, Path(MODELS))
    with (work / "neural_cleanse.npz").open("ab") as f:  # Neural Cleanse ran again since the export
        f.write(b"\0")
    assert not _current(builder, Path(MODELS))
