import numpy as np
import pytest

from training.evaluate import choose_n, nc_summary
from training.evaluation_report import roc_points
from training.metrics import auroc


def test_auroc_hand_computed_with_ties() -> None:
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    # pairs (neg, pos): (1,1) tie -> 0.5, (1,2) -> 1, (3,1) -> 0, (3,2) -> 0: 1.5 / 4
    assert auroc(np.array([1.0, 3.0]), np.array([1.0, 2.0])) == pytest.approx(0.375)


def test_roc_points_end_at_one() -> None:
    fpr, tpr = roc_points(np.array([0.1, 0.2, 0.3]), np.array([0.25, 0.4]))
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_choose_n_weighs_the_auroc_plateau_against_cost() -> None:
    rows = [
        {"n": 4, "auroc": 0.990, "ms_per_image": 0.5},
        {"n": 8, "auroc": 0.9975, "ms_per_image": 1.0},
        {"n": 32, "auroc": 0.998, "ms_per_image": 4.0},
    ]
    sentence = choose_n(rows, current=32)
    assert "plateaus from N = 8" in sentence and "4.0x the cost of N = 8" in sentence
    assert "the default stays." in choose_n(rows[:1] + rows[2:], current=32)


def test_nc_summary_reports_the_largest_small_norm_index() -> None:
    summary = nc_summary({"neural_cleanse": {"l1_norms": [1, 5, 6, 7], "anomaly_index": [3.0, 0.5, 0.1, 0.6]}})
    assert summary["max_small_index"] == 3.0
