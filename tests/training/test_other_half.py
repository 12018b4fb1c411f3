"""training.other_half: the two halves side by side, and the bars on which they disagree (no model run here)."""

from training.other_half import compare, render


def suite(tpr: float, clean_change: float, met: bool) -> dict:
    attack = {"fused": {"tpr": tpr, "fpr": 0.01}, "attack_success_after": 0.0, "clean_accuracy": 0.9,
              "clean_accuracy_guarded": 0.9 + clean_change}  # fmt: skip
    bar = {"attack": "key", "tpr>=95%": True, "fpr<=2%": True, "asr_after<=2%": True,
           "clean_acc>=undefended-1pt": met, "as_sent_within_5pt": True}  # fmt: skip
    return {"attacks": {"key": attack}, "bars": [bar], "clean_model": {"fpr": 0.0102}}


def test_the_halves_are_set_side_by_side_with_the_bars_they_disagree_on() -> None:
    reported, other = suite(0.9975, -0.0092, True), suite(0.9960, -0.0110, False)
    c = compare(reported, other)
    assert c["attacks"]["key"]["bars_differ"] == ["clean_acc>=undefended-1pt"]
    text = render({"command": "python -m training.other_half", "seconds": 60.0, "first_image": 5000,
                   "images": 5000, "compare": c})  # fmt: skip
    row = "| key | 99.75% / 99.60% | 1.00% / 1.00% | 0.00% / 0.00% | -0.92 / -1.10 | clean_acc>=undefended-1pt |"
    assert row in text
    assert "test images 5000 to 9999" in text and "Clean model: fused FPR 1.02% / 1.02%." in text
