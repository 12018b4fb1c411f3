"""`make repair-sweep`'s bookkeeping (no training here): where the kwon entry's models come from, the summary
per candidate and the report that quotes it."""

from dataclasses import replace
from pathlib import Path

import pytest

from service.bundle import read_manifest
from training.repair import RepairConfig
from training.repair_sweep import BAR, CANDIDATES, entry_builder, render, summarise

MODELS = Path("models")


def test_kwon_is_repaired_from_the_shipped_checkpoints_with_the_shipped_calibration_split() -> None:
    builder, classifier, reversed_triggers = entry_builder("kwon", MODELS)
    manifest = read_manifest(MODELS)
    assert classifier == MODELS / manifest["checkpoints"]["classifier"]["path"] and classifier.is_file()
    assert reversed_triggers == MODELS / manifest["checkpoints"]["reversed_triggers"]["path"]
    assert reversed_triggers.is_file()
    assert builder.config.calibration.repair_share == manifest["configs"]["calibration"]["repair_share"]
    assert builder.config.calibration.bank_size == manifest["configs"]["calibration"]["bank_size"]


def test_every_candidate_differs_from_the_default_in_what_its_name_says() -> None:
    base = CANDIDATES["prune and unlearn (the default)"]
    assert base == RepairConfig() and base.prune and base.unlearn_share > 0  # today's default
    assert base.distill == 0.0 and base.tune_layers == 0
    assert CANDIDATES["fine-tuning alone"] == replace(base, prune=False, unlearn_share=0.0)
    assert CANDIDATES["distillation 0.5"] == replace(base, distill=0.5)
    assert CANDIDATES["last 3 layers"] == replace(base, tune_layers=3)
    assert CANDIDATES["last 3 layers, distillation 0.5"] == replace(base, tune_layers=3, distill=0.5)
    assert CANDIDATES["last 2 layers, distillation 0.5"] == replace(base, tune_layers=2, distill=0.5)
    assert len(set(CANDIDATES.values())) == len(CANDIDATES)  # no two alike


def _row(change: float, success: float | None) -> dict[str, float]:
    row = {"clean_accuracy": 0.9 + change, "accuracy_change": change, "triggered_true_label": 0.8, "seconds": 2.0}
    return row | ({"attack_success": success} if success is not None else {})


def test_summary_counts_the_bar_per_candidate_and_leaves_the_clean_model_out_of_attack_success() -> None:
    entries = {
        "kwon": {"arch": "kwon-cnn", "original": _row(0.0, 0.99), "a": _row(-0.02, 0.10), "b": _row(-0.005, 0.40)},
        "wanet": {"arch": "kwon-cnn", "original": _row(0.0, 0.98), "a": _row(-BAR, 0.05), "b": _row(0.001, 0.20)},
        "clean": {"arch": "mlp", "original": _row(0.0, None), "a": _row(-0.03, None), "b": _row(0.0, None)},
    }
    s = summarise(entries, ["a", "b"])
    assert s["a"]["within_bar"] == 1 and s["a"]["models"] == 3  # -1 point exactly is within; -2 and -3 are not
    assert s["b"]["within_bar"] == 3
    assert s["a"]["worst_accuracy_change"] == pytest.approx(-0.03)
    assert s["a"]["worst_attack_success"] == pytest.approx(0.10) and s["b"]["mean_attack_success"] == pytest.approx(
        0.30
    )
    report = {
        "command": "python -m training.repair_sweep",
        "seconds": 90.0,
        "images": 100,
        "candidates": {"a": {**RepairConfig().__dict__}, "b": {**RepairConfig(mixup=0.2).__dict__}},
        "attacks": entries,
        "summary": s,
    }
    text = render(report)
    assert "`python -m training.repair_sweep`" in text
    assert "- a: the default" in text and "- b: `mixup=0.2`" in text
    assert "| a | 1 of 3 | -3.00 / -2.00 | 10.00% / 7.50% | 6 |" in text
    assert "| clean (mlp): 90.00%, no attack | -3.00 / - / 80.00% | +0.00 / - / 80.00% |" in text
