"""Model repair's pieces on a small model trained in seconds: pruning keeps accuracy, the perturbation is
bounded and adversarial, and the whole repair keeps the model's interface and clean accuracy."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.classifier import ClassifierConfig, build_classifier, train_classifier
from training.repair import (
    RepairConfig,
    accuracy,
    distillation,
    freeze_all_but,
    frozen_statistics,
    prune_dormant,
    repair,
    tuned_parameters,
    universal_perturbation,
)


@pytest.fixture(scope="module")
def toy() -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    """An MLP on 10 noisy prototype images (one per class), 1,200 images; 97%+ accurate after 2 epochs."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    prototypes = rng.random((10, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 1200)
    images = np.clip(prototypes[labels] + rng.normal(0, 0.3, (1200, 1, 28, 28)), 0, 1).astype(np.float32)
    model = train_classifier(images, labels, ClassifierConfig(arch="mlp", epochs=2, batch_size=64))
    assert accuracy(model, images, labels) > 0.95
    return model, images, labels


def test_pruning_stops_before_the_accuracy_margin(toy: tuple[torch.nn.Module, np.ndarray, np.ndarray]) -> None:
    model, images, labels = toy
    clone = build_classifier("mlp")
    clone.load_state_dict(model.state_dict())
    clone.eval()
    before = accuracy(clone, images[1000:], labels[1000:])
    config = RepairConfig(prune_margin=0.02)
    pruned = prune_dormant(clone, images[:1000], labels[:1000], images[1000:], labels[1000:], config)
    assert len(pruned) > 0  # an MLP on this task has dormant neurons
    assert accuracy(clone, images[1000:], labels[1000:]) >= before - 0.02
    assert (clone.head[-1].weight[:, torch.from_numpy(pruned)] == 0).all()


def test_universal_perturbation_is_bounded_and_raises_the_loss(
    toy: tuple[torch.nn.Module, np.ndarray, np.ndarray],
) -> None:
    model, images, labels = toy
    x, y = torch.from_numpy(images[:128]), torch.from_numpy(labels[:128])
    config = RepairConfig(adv_radius=3.0, adv_steps=5)
    delta = universal_perturbation(model, x, y, config)
    assert delta.shape == (1, 1, 28, 28)
    assert float(delta.norm()) <= 3.0 + 1e-4
    with torch.no_grad():
        clean = F.cross_entropy(model(x)[0], y)
        attacked = F.cross_entropy(model((x + delta).clamp(0, 1))[0], y)
    assert attacked > clean


def test_repair_keeps_the_interface_and_clean_accuracy(toy: tuple[torch.nn.Module, np.ndarray, np.ndarray]) -> None:
    model, images, labels = toy
    clone = build_classifier("mlp")
    clone.load_state_dict(model.state_dict())
    masks = np.zeros((10, 28, 28), np.float32)
    masks[:, :4, :4] = 1.0
    patterns = np.ones((10, 1, 28, 28), np.float32)
    repaired, facts = repair(clone, images[:800], labels[:800], masks, patterns, RepairConfig(epochs=2, adv_steps=2))
    logits, features = repaired(torch.from_numpy(images[:3]))
    assert logits.shape == (3, 10) and features.shape == (3, 256)
    assert accuracy(repaired, images[800:], labels[800:]) >= accuracy(model, images[800:], labels[800:]) - 0.02
    assert facts["repair_images"] == 640 and 0 <= facts["pruned_share"] <= 0.8


@pytest.mark.parametrize("knobs", [{"distill": 0.5, "distill_temperature": 2.0}, {"mixup": 0.2}])
def test_distillation_and_mixup_train_another_model_that_keeps_clean_accuracy(
    toy: tuple[torch.nn.Module, np.ndarray, np.ndarray], knobs: dict[str, float]
) -> None:
    """The regularisers `make repair-sweep` weighs change what the repair learns (not a no-op) and keep it
    accurate; the original model, the distillation's teacher, is left as it was."""
    model, images, labels = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = np.zeros((10, 28, 28), np.float32)
    masks[:, :4, :4] = 1.0
    patterns = np.ones((10, 1, 28, 28), np.float32)
    repaired = {}
    for name, config in {"plain": RepairConfig(epochs=2), "regularised": RepairConfig(epochs=2, **knobs)}.items():
        clone = build_classifier("mlp")
        clone.load_state_dict(model.state_dict())
        repaired[name], _ = repair(clone, images[:800], labels[:800], masks, patterns, config)
        assert (
            accuracy(repaired[name], images[800:], labels[800:]) >= accuracy(model, images[800:], labels[800:]) - 0.02
        )
    x = torch.from_numpy(images[800:])
    with torch.no_grad():
        assert not torch.allclose(repaired["plain"](x)[0], repaired["regularised"](x)[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_distillation_loss_is_zero_for_the_teachers_own_logits_and_positive_otherwise() -> None:
    logits = torch.randn(8, 10)
    assert float(distillation(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation(torch.zeros(8, 10), logits, 2.0)) > 0


@pytest.mark.parametrize(
    ("arch", "k", "first"),
    [
        ("kwon-cnn", 1, "head.1.weight"),
        ("kwon-cnn", 3, "fc.1.weight"),  # every dense layer after the convolutions
        ("cao-cnn", 2, "fc.1.weight"),
        ("cnn-bn", 3, "conv.10.weight"),  # the last convolution and the BatchNorm after it
        ("mlp", 5, "fc.1.weight"),  # more layers than the model has: all of them
    ],
)
def test_the_last_k_weight_layers_are_cut_in_the_models_own_order(arch: str, k: int, first: str) -> None:
    model = build_classifier(arch)
    names = [n for n, _ in model.named_parameters()]
    tuned = tuned_parameters(model, k)
    assert tuned == names[names.index(first) :]
    assert tuned_parameters(model, 0) == names


def test_a_model_without_weight_layers_is_tuned_whole() -> None:
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4))  # 1-D parameters only: no layer to count by
    assert tuned_parameters(model, 2) == ["0.weight", "0.bias"]


def test_tuning_the_last_layers_leaves_the_others_and_their_statistics_as_they_were() -> None:
    """With tune_layers the convolutions and their BatchNorm running statistics come back bit for bit, the dense
    layers move, and every parameter is as trainable afterwards as it came (here: all of them; a later stage may
    fine-tune them)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_classifier("cnn-bn").eval()
    images = rng.random((96, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = np.zeros((2, 28, 28), np.float32)
    masks[:, :4, :4] = 1.0
    patterns = np.ones((2, 1, 28, 28), np.float32)
    config = RepairConfig(epochs=1, batch_size=32, prune=False, tune_layers=2)
    repaired, facts = repair(model, images, labels, masks, patterns, config)
    after = repaired.state_dict()
    for name, value in before.items():
        moved = not torch.equal(value, after[name])
        assert moved == (name.startswith(("fc.", "head.")) and not name.endswith("num_batches_tracked")), name
    assert all(p.requires_grad for p in repaired.parameters())
    assert 0 < facts["tuned_share"] < 1


def test_only_normalisation_layers_with_frozen_parameters_keep_their_statistics() -> None:
    """A BatchNorm whose parameters are frozen keeps its running statistics; one without parameters (affine=False)
    cannot be placed in the layer cut and updates them, as every layer did before tune_layers."""
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4, affine=False)
    )
    freeze_all_but(model, 0)
    assert frozen_statistics(model) == []
    freeze_all_but(model, 1)  # the last Linear only: the first BatchNorm is frozen, the affine-free one is not
    assert frozen_statistics(model) == [model[1]]
