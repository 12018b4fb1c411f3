"""training.choices: the candidates it weighs and the table it writes (no model run here)."""

from training.choices import DROP, candidates, render


def test_each_candidate_changes_one_thing_of_the_default() -> None:
    signals = ["detrigger", "activation", "repaired", "expert", "mahalanobis"]
    c = candidates(signals, "fisher")
    assert c["default"] == (signals, "fisher") and c["rule max"] == (signals, "max")
    assert c["repaired scored by the drop"][0] == ["detrigger", "activation", DROP, "expert", "mahalanobis"]
    assert c["+ squeeze"][0] == [*signals, "squeeze"] and c["+ masked_ae"][0] == [*signals, "masked_ae"]
    assert "mahalanobis" not in c["- mahalanobis"][0]
    assert all(rule == "fisher" for s, rule in c.values() if s != signals)


def test_the_table_gives_each_attack_and_the_worst_change() -> None:
    attacks = {"key": {"default": {"tpr": 0.9962, "fpr": 0.014}, "rule max": {"tpr": 0.9861, "fpr": 0.011}}}
    rows = {
        "default": {"worst_tpr_change": 0.0, "worst_tpr_attack": "key", "best_tpr_change": 0.0,
                    "worst_fpr_change": 0.0},
        "rule max": {"worst_tpr_change": -0.0101, "worst_tpr_attack": "key", "best_tpr_change": -0.0101,
                     "worst_fpr_change": -0.003},
    }  # fmt: skip
    text = render({"command": "python -m training.choices", "seconds": 150.0, "first_image": 5000, "images": 5000,
                   "attacks": attacks, "candidates": rows})  # fmt: skip
    assert "| rule max | 98.61 / 1.10 | -1.01 (key) | -1.01 | -0.30 |" in text
