"""The suite section of reports/evaluation.md renders from attack_suite.json's shape (no models needed)."""

from training.evaluation_report import render_suite
from training.suite import AS_SENT, bars


def fake_attack(tpr: float) -> dict:
    signals = {s: {"tpr": tpr / 2, "fpr": 0.01, "auroc": 0.9} for s in ("detrigger", "strip", "repaired")}
    sent = {v: {"tpr": tpr, "fpr": 0.01, "attack_success_after": 0.01} for v in AS_SENT}
    ablation = {"all": {"tpr": tpr, "fpr": 0.01}, **{f"without {s}": {"tpr": tpr - 0.1, "fpr": 0.01} for s in signals}}
    ablation["without repaired"] = {"tpr": tpr, "fpr": 0.01}
    source = {"attack_success_after": 0.01, "triggered_true_label": 0.9, "clean_accuracy": 0.9}
    return {
        "description": "a trigger", "arch": "mlp", "images": {"clean": 100, "triggered": 90},
        "clean_accuracy": 0.9, "attack_success": 0.99, "nc_flagged": [1], "signals": signals,
        "fused": {"tpr": tpr, "fpr": 0.01, "auroc": 0.99}, "fused_fired": {"images": 80, "tpr": min(1.0, tpr + 0.05)},
        "attack_success_after": 0.01,
        "triggered_true_label": 0.9, "clean_accuracy_guarded": 0.895, "as_sent": sent, "ablation": ablation,
        "label_sources": {"detrigger": source, "repaired": source},
        "misses": {
            "attacker_wins": 4, "attacker_wins_unflagged": 3, "attacker_wins_repaired_agrees": 1,
            "attacker_wins_by_true_label": {"Shirt": 1, "Sandal": 3}, "clean_given_attack_label_all": 0.01,
            "clean_given_attack_label": {"Shirt": 0.02, "Sandal": 0.05}, "clean_flagged": 3,
            "clean_flagged_right_before": 2, "clean_flagged_right_after": 1, "target_fpr": 0.01,
            "calibration_images": 1600,
        },
    }  # fmt: skip


CLEAN = {"arch": "mlp", "fpr": 0.012, "nc_flagged": [], "clean_accuracy": 0.9, "clean_accuracy_guarded": 0.89,
         "images": 100}  # fmt: skip
UNDEFENDED = {"clean_accuracy": 0.9, "target_class_accuracy": 0.8, "attack_success": 0.99}
DEFENDED = {"clean_accuracy": 0.85, "target_class_accuracy": 0.5, "attack_success": 0.05}
ISOLATION = {"isolated": 550, "isolation_precision": 1.0, "isolation_recall": 0.1}
HEADINGS = ("The attack suite", "Each signal per attack", "What each signal adds", "As the images arrive",
            "Where a flagged image's label comes from", "Anti-Backdoor Learning", "The bar, per attack",
            "Where a bar is missed")  # fmt: skip


def test_render_suite_has_every_table_and_says_which_signal_carries_each_attack() -> None:
    suite = {
        "command": "python -m training.evaluate",
        "as_sent_images": 50,
        "attacks": {"one": fake_attack(0.99), "two": fake_attack(0.5)},
        "clean_model": {
            "arch": "mlp",
            "fpr": 0.012,
            "nc_flagged": [],
            "clean_accuracy": 0.9,
            "clean_accuracy_guarded": 0.89,
            "images": 100,
        },
        "abl": {
            "one": {
                "arch": "mlp",
                "undefended": {"clean_accuracy": 0.9, "target_class_accuracy": 0.8, "attack_success": 0.99},
                "abl": {"clean_accuracy": 0.85, "target_class_accuracy": 0.5, "attack_success": 0.05},
                "isolation": {"isolated": 550, "isolation_precision": 1.0, "isolation_recall": 0.1},
            }
        },
    }
    suite["attacks"]["two"].update(attack_success_after=0.04, clean_accuracy_guarded=0.88)
    suite["bars"] = bars(suite)
    text = "\n".join(render_suite(suite))
    for heading in HEADINGS:
        assert heading in text
    assert "without detrigger the fused TPR falls by 10.0 points" in text
    assert "| two |" in text and "**no**" in text  # the 50% attack misses its bar, and says so
    assert "| 50.00% / 1.00% (0.9900) | 55.00% |" in text  # beside it, the TPR where the trigger worked
    # what lies behind the misses, for the attack that misses and not for the one that meets its bar
    behind = text[text.index("### Where a bar is missed") :]
    assert "- **two**: The trigger gives the attacker's label on 99.00% of the triggered images" in behind
    assert "flags 55.00% of those (fused TPR over all of them: 50.00%)" in behind and "- **one**" not in behind
    assert "Most are true Sandal (3), Shirt (1): " in behind
    assert "to Sandal 5.00%, Shirt 2.00% (all victim labels: 1.00%)" in behind
    assert "3 of them not flagged; the repaired model gives the attacker's label on 1 of them" in behind
    assert "2 of them had the right label and lose it" in behind
    assert "Of the 1 with a wrong one, the label source gives 1 the right label" in behind
    assert "net, 1 of the 100 clean images lose a right label (1.00%)" in behind


def test_a_clean_accuracy_miss_weighs_the_flagged_share_against_sampling() -> None:
    """The clean images the guard flags are weighed against what sampling alone gives around the target (the
    threshold's calibration images and the test's), and only beyond it blamed on how the signals add up."""
    from training.evaluation_report import flagged_clean, sampling_band

    low, high = sampling_band(0.01, 1622, 5000)
    assert abs(high - 0.01 - 1.96 * (0.01 * 0.99 * (1 / 1622 + 1 / 5000)) ** 0.5) < 1e-12
    assert abs(low + high - 0.02) < 1e-12
    attack = fake_attack(0.99)
    attack["images"]["clean"] = 5000
    m = {**attack["misses"], "clean_flagged": 83, "clean_flagged_right_before": 75, "clean_flagged_right_after": 5,
         "calibration_images": 1622}  # fmt: skip
    attack["fused"]["fpr"] = 0.0166
    said = flagged_clean(attack, m)
    assert "The guard flags 83 clean images (FPR 1.66%)." in said
    assert f"within {100 * low:.2f}%-{100 * high:.2f}%" in said and "1.56%" in said
    assert "Each signal alone flags 1.00%-1.00% of these clean images" in said
    assert "75 of them had the right label and lose it" in said and "net, 70 of the 5000 clean images" in said
    attack["fused"]["fpr"] = 0.0120  # within the band: not blamed on the signals
    assert "Each signal alone" not in flagged_clean(attack, m)
    del m["calibration_images"]  # a report from before the key: no band, the rest as before
    assert "sampling alone" not in flagged_clean(attack, m) and "net, 70" in flagged_clean(attack, m)


def test_an_as_sent_miss_says_whether_the_guard_or_the_trigger_lost_it() -> None:
    """Where a way of sending the images costs more than 5 points of TPR, the report weighs the TPR over the
    triggered images the trigger still worked on, as sent and as they are."""

    def suite_with(jpeg_fired_tpr: float) -> str:
        attack = fake_attack(0.99)
        attack["as_sent_baseline"] = {"tpr": 0.99, "fpr": 0.01, "attack_success_after": 0.01,
                                      "fused_fired": {"images": 45, "tpr": 1.0}}  # fmt: skip
        attack["as_sent"]["jpeg75"] = {"tpr": 0.80, "fpr": 0.01, "attack_success_after": 0.02, "attack_success": 0.8,
                                       "fused_fired": {"images": 36, "tpr": jpeg_fired_tpr}}  # fmt: skip
        suite = {"command": "python -m training.evaluate", "as_sent_images": 50, "attacks": {"one": attack},
                 "clean_model": CLEAN}  # fmt: skip
        suite["bars"] = bars(suite)
        assert not suite["bars"][0]["as_sent_within_5pt"]
        text = "\n".join(render_suite(suite))
        return text[text.index("### Where a bar is missed") :]

    held = suite_with(0.99)
    assert "Worst as sent: jpeg75, fused TPR 80.00%" in held
    assert "the fused TPR is 99.00% as sent (36 images) against 100.00% as they are (45)" in held
    assert "the guard holds on the attacks that still work" in held
    assert "the guard loses more than the trigger does" in suite_with(0.90)
