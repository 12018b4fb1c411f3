"""Detection per cost (training/cost.py): candidate sets, their cost, and fusion as calibration does it."""

import numpy as np
import pytest

from training.cost import best_source, candidates, fused_rates, label_sources


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


@pytest.mark.data
def test_each_label_source_is_weighed_under_the_bundles_own_policy(fashion_mnist) -> None:
    from service.bundle import Bundle, build_pipeline
    from service.guard import GuardResult
    from service.preprocess import to_model_input
    from tests.conftest import MODELS
    from training.attacks import PRESETS, attack_labels, triggered_pixels, victims

    bundle, attack = Bundle.load(MODELS), PRESETS["kwon"]
    pixels, labels = fashion_mnist.test.images[:200], fashion_mnist.test.labels[:200]
    idx = victims(labels, attack)
    clean, triggered = to_model_input(pixels), to_model_input(triggered_pixels(pixels[idx], attack))
    wanted = attack_labels(labels[idx], attack, 10)
    rates = label_sources(bundle, clean, labels, triggered, labels[idx], wanted)
    assert set(rates) == {"restored", "repaired", "both"}
    # the bundle's own source gives what the guard itself answers (the reference: GuardResult.labels)
    own = bundle.manifest["thresholds"]["label_source"]["source"]
    guard = build_pipeline(bundle)
    given = GuardResult.concat(guard.run_chunked(triggered)).labels
    assert rates[own]["attack_success_after"] == np.mean(given == wanted)
    assert rates[own]["triggered_true_label"] == np.mean(given == labels[idx])
    assert rates[own]["clean_accuracy_guarded"] == np.mean(
        GuardResult.concat(guard.run_chunked(clean)).labels == labels
    )


def test_the_source_chosen_keeps_the_attackers_label_lowest_first() -> None:
    row = lambda asr, true: {"attack_success_after": asr, "triggered_true_label": true}  # noqa: E731
    sources = {
        "a": {"restored": row(0.01, 0.90), "repaired": row(0.20, 0.95), "both": row(0.01, 0.92)},
        "b": {"restored": row(0.04, 0.80), "repaired": row(0.02, 0.85), "both": row(0.03, 0.84)},
    }
    assert best_source(sources) == "both"  # worst 3% against 4% (restored) and 20% (repaired)
    sources["b"]["restored"] = row(0.03, 0.90)
    assert best_source(sources) == "restored"  # the same worst: the higher mean true label
