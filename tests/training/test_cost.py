"""Detection per cost (training/cost.py): candidate sets, their cost, and fusion as calibration does it."""

import numpy as np
import pytest

from training.cost import candidates, fused_rates


def test_candidates_cost_what_their_signals_hand_the_classifier() -> None:
    signals = ["detrigger", "strip", "activation", "expert"]
    passes = {"detrigger": 1, "strip": 32, "activation": 0, "expert": 1}
    c = candidates(signals, passes)
    assert c["N=32"] == (32, signals, 1 + 1 + 32 + 0 + 1)
    assert c["N=8 without expert"] == (8, ["detrigger", "strip", "activation"], 1 + 1 + 8)
    assert c["without strip"][1:] == (["detrigger", "activation", "expert"], 3)
    assert c["without strip, expert"][1:] == (["detrigger", "activation"], 2)  # and one more left out
    assert "without strip, detrigger" not in c and "without strip, strip" not in c
    assert not any("without detrigger" in k for k in c)  # the label policy needs its restoration


def test_fused_rates_threshold_on_half_b_at_the_target_fpr() -> None:
    rng = np.random.default_rng(0)
    clean = lambda n: {"a": rng.normal(size=n), "b": rng.normal(size=n)}  # noqa: E731
    sets = {
        "a": clean(4000), "b": clean(4000), "clean": clean(4000),
        "triggered": {"a": rng.normal(4.0, 1.0, 1000), "b": rng.normal(size=1000)},  # a alone separates
    }  # fmt: skip
    one = fused_rates(sets, ["a"], "fisher", 0.01)
    assert 0.005 <= one["fpr"] <= 0.02 and one["tpr"] > 0.85  # N(4, 1) above N(0, 1)'s 99th percentile
    both = fused_rates(sets, ["a", "b"], "fisher", 0.01)
    assert 0.005 <= both["fpr"] <= 0.02 and both["tpr"] < one["tpr"]  # a noise signal only dilutes


@pytest.mark.data
def test_the_full_set_weighs_strip_beside_a_bundle_that_leaves_it_out() -> None:
    from service.bundle import Bundle
    from tests.conftest import MODELS
    from training.cost import full_set, signal_passes

    bundle = Bundle.load(MODELS)
    assert "strip" not in bundle.signal_names  # make cost's choice, shipped
    signals = full_set(bundle)
    assert signals == [*bundle.signal_names, "strip"]
    n = bundle.manifest["configs"]["strip"]["n"]  # STRIP runs at the bundle's config when weighed
    assert signal_passes(bundle, signals) == {**signal_passes(bundle), "strip": n}
