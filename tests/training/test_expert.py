"""The backdoor expert: mislabelled clean fine-tuning forgets the classes and keeps the backdoor."""

import numpy as np
import torch

from service.preprocess import to_model_input
from training.attacks import PRESETS, poison, triggered_pixels
from training.classifier import ClassifierConfig, train_classifier
from training.common import predict
from training.expert import ExpertConfig, train_expert, wrong_labels


def test_wrong_labels_are_uniform_over_the_other_classes() -> None:
    labels = np.repeat(np.arange(10), 2000)
    wrong = wrong_labels(labels, 10, np.random.default_rng(0))
    assert (wrong != labels).all()
    counts = np.bincount(wrong[labels == 3], minlength=10)
    assert counts[3] == 0 and counts.min(where=np.arange(10) != 3, initial=10**9) > 150  # ~222 each


def test_the_expert_keeps_the_backdoor_and_loses_the_classes(fashion_mnist) -> None:  # type: ignore[no-untyped-def]
    """A small backdoored MLP (kwon's trigger, 3 epochs on 6,000 images); its expert, fine-tuned on 1,500
    clean calibration images with wrong labels, still sends triggered images to the target but has
    forgotten the classes: its clean accuracy falls to the stop rule's level while the attack success stays."""
    torch.set_num_threads(1)
    attack = PRESETS["kwon"]
    ds = fashion_mnist
    x, y = to_model_input(ds.train.images[:6000]), ds.train.labels[:6000]
    px, py = poison(x, y, attack, 10)[:2]
    model = train_classifier(px, py, ClassifierConfig(arch="mlp", epochs=3), 10)
    test = ds.test.images[:1000][ds.test.labels[:1000] != attack.target]
    triggered = to_model_input(triggered_pixels(test, attack))
    clean_x, clean_y = to_model_input(ds.test.images[:1000]), ds.test.labels[:1000]

    def rates(m: torch.nn.Module) -> tuple[float, float]:
        return (float((predict(m, clean_x)[0].argmax(1) == clean_y).mean()),
                float((predict(m, triggered)[0].argmax(1) == attack.target).mean()))  # fmt: skip

    accuracy, success = rates(model)
    assert accuracy > 0.75 and success > 0.9, "the model under test must carry the backdoor"
    cal = to_model_input(ds.calibration.images[:1500])
    config = ExpertConfig(stop_accuracy=0.5)  # this small model starts at ~77%: a stop well below that
    expert, facts = train_expert(model, cal, ds.calibration.labels[:1500], 10, config)
    e_accuracy, e_success = rates(expert)
    assert facts["holdout_accuracy_after"] <= config.stop_accuracy and facts["steps"] < 4 * 19  # the rule, not the cap
    assert e_accuracy < 0.6, "the expert forgot the classes"
    assert e_success > 0.9, "and kept the backdoor"
