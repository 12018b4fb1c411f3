"""Anti-Backdoor Learning on tiny hand-made data, in seconds: the flooded loss against its formula, isolation of a
trivially learnable trigger, unlearning that forgets it, and the wiring from the CLI to the checkpoint."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import training.__main__ as cli
import training.common
from training.abl import ABLConfig, agreement, flooded_loss, isolate, train_abl, unlearn
from training.attacks import PRESETS
from training.classifier import ClassifierConfig, load_classifier, train_classifier
from training.data import Dataset, Split
from training.pipeline import BuildConfig, Builder

MLP = ClassifierConfig(arch="mlp", batch_size=64)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """setup_torch takes every core; these tests share the machine, so they take one."""
    torch.set_num_threads(1)
    monkeypatch.setattr(training.common.os, "cpu_count", lambda: 1)


def stamp_patch(images: np.ndarray) -> np.ndarray:
    """A bright 4x4 patch at rows/cols 1-4 (where the `kwon` preset puts its trigger)."""
    out = images.copy()
    out[:, :, 1:5, 1:5] = 1.0
    return out


def trigger_data(n: int = 600, n_poison: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dim noise images with random labels (learnable only by rote) and `n_poison` of them carrying the patch and
    label 0 (learnable at once). Returns images (N, 1, 28, 28), labels (N,), the poisoned indices."""
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 1, 28, 28)) * 0.5).astype(np.float32)
    labels = rng.integers(0, 10, n)
    poisoned = np.sort(rng.choice(n, n_poison, replace=False))
    images[poisoned] = stamp_patch(images[poisoned])
    labels[poisoned] = 0
    return images, labels, poisoned


def test_flooded_loss_descends_above_gamma_and_ascends_below() -> None:
    """Against the formula by hand: CE of logits (0, 0) is ln 2 > 0.5, of (3, 0) with label 0 it is
    ln(1 + e^-3) < 0.5; the gradient of the mean CE over logits is (softmax - onehot) / N."""
    labels = torch.tensor([0, 0])
    for row, sign in (((0.0, 0.0), 1.0), ((3.0, 0.0), -1.0)):
        logits = torch.tensor([row, row], requires_grad=True)
        ce = math.log1p(math.exp(row[1] - row[0]))
        loss = flooded_loss(logits, labels, gamma=0.5)
        assert float(loss.detach()) == pytest.approx(sign * ce, rel=1e-6)
        p1 = 1.0 / (1.0 + math.exp(row[0] - row[1]))  # softmax of class 1
        expected = sign * torch.tensor([[-p1, p1], [-p1, p1]]) / 2
        (grad,) = torch.autograd.grad(loss, logits)
        torch.testing.assert_close(grad, expected)


def test_isolate_takes_the_lowest_losses() -> None:
    losses = np.array([0.9, 0.1, 2.0, 0.05, 0.3, 1.0, 0.2, 0.7, 3.0, 0.15])
    assert isolate(losses, 0.3).tolist() == [1, 3, 9]
    assert isolate(losses, 0.0).tolist() == []


def test_isolation_finds_the_trigger_examples() -> None:
    images, labels, poisoned = trigger_data()
    config = ABLConfig(isolation_epochs=3, isolation_share=0.05, clean_epochs=1, unlearn_epochs=1)
    model, facts = train_abl(images, labels, MLP, config, poisoned=poisoned)
    assert facts["isolated"] == 30
    assert facts["isolation_precision"] >= 0.9  # measured 1.0; chance is 0.05
    assert facts["isolation_recall"] == facts["isolation_precision"]  # as many isolated as poisoned
    assert facts["isolated_loss_max"] < facts["isolation_median_loss"]
    assert not model.training
    # Without the patch the same examples, still labelled 0, are found only as often as any label-0 example: they
    # are 30 of ~87 (measured 0.1-0.4 over three seeds). The isolation keys on the trigger, not on the label.
    clean = images.copy()
    clean[poisoned] = trigger_data(seed=1)[0][:30]
    _, control = train_abl(clean, labels, MLP, config, poisoned=poisoned)
    assert control["isolation_precision"] < 0.6


def test_unlearning_forgets_the_trigger() -> None:
    """A plainly trained model follows the patch; ascent on the poisoned examples lowers its agreement with their
    label, on them and on patched images it never saw."""
    images, labels, poisoned = trigger_data()
    model = train_classifier(images, labels, ClassifierConfig(arch="mlp", epochs=3, batch_size=64))
    fresh = stamp_patch(trigger_data(n=200, seed=2)[0])
    target = np.zeros(len(fresh), np.int64)
    assert agreement(model, images[poisoned], labels[poisoned]) >= 0.9
    assert agreement(model, fresh, target) >= 0.9
    config = ABLConfig()
    rng = np.random.default_rng(0)
    unlearn(model, images[poisoned], labels[poisoned], config.unlearn_epochs, config.unlearn_lr, 64, rng)
    assert not model.training
    assert agreement(model, images[poisoned], labels[poisoned]) <= 0.2
    assert agreement(model, fresh, target) <= 0.2


def test_config_resolves_from_the_classifier_and_fails_fast() -> None:
    resolved = ABLConfig(isolation_epochs=5).resolved(ClassifierConfig(epochs=15, seed=7))
    assert (resolved.clean_epochs, resolved.seed) == (10, 7)
    assert ABLConfig(clean_epochs=3, seed=1).resolved(ClassifierConfig(epochs=2)).clean_epochs == 3
    assert ABLConfig().resolved(ClassifierConfig(epochs=1)).clean_epochs == 1  # smoke runs still train the rest
    with pytest.raises(ValueError, match="isolation_share"):
        ABLConfig(isolation_share=1.5)
    with pytest.raises(ValueError, match="defense"):
        BuildConfig(defense="strip")


def test_cli_parses_the_defense_and_hands_it_to_the_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cli.parse_args(["classifier"]).defense == "none"
    assert cli.parse_args(["classifier", "--defense", "abl"]).defense == "abl"
    with pytest.raises(SystemExit):
        cli.parse_args(["classifier", "--defense", "nope"])
    seen: list[object] = []

    class Recorder:
        def __init__(
            self, config: BuildConfig, out: Path, work: Path, classifier: Path | None = None, **_: object
        ) -> None:
            seen.append(config)
            self.timings: dict[str, float] = {}

        def run(self, stage: str) -> None:
            seen.append(stage)

    monkeypatch.setattr(cli, "Builder", Recorder)
    cli.main(["classifier", "--defense", "abl", "--seed", "3", "--out", str(tmp_path)])
    config, stage = seen
    assert isinstance(config, BuildConfig) and stage == "classifier"
    assert config.defense == "abl" and config.abl.resolved(config.classifier).seed == 3


@pytest.mark.parametrize("defense", ["none", "abl"])
def test_classifier_stage_records_the_defense(defense: str, tmp_path: Path) -> None:
    """The pipeline's classifier stage on 600 noise images poisoned by the `kwon` preset (60 examples)."""
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 128, (600, 28, 28), dtype=np.uint8), rng.integers(0, 10, 600))
    config = BuildConfig(
        attack="kwon",
        classifier=replace(MLP, epochs=1),
        defense=defense,
        abl=ABLConfig(isolation_epochs=2, isolation_share=0.05, unlearn_epochs=1),
    )
    builder = Builder(config, tmp_path / "out", tmp_path / "work")
    builder.__dict__["dataset"] = Dataset("noise", split, split, split, tuple(map(str, range(10))))
    builder.run("classifier")
    meta = json.loads((tmp_path / "work" / "classifier.json").read_text())
    assert meta["poisoned"] == round(PRESETS["kwon"].poison_rate * 600)
    load_classifier(tmp_path / "work" / "classifier.pt")
    assert meta["input_shape"] == [1, 28, 28]
    if defense == "none":  # exactly what the stage wrote before ABL existed, and the input shape
        assert set(meta) == {"arch", "config", "num_classes", "input_shape", "attack", "poisoned"}
        return
    assert meta["defense"] == "abl"
    assert meta["abl"] == {**meta["abl"], "clean_epochs": 1, "seed": 0, "isolation_share": 0.05}  # resolved
    assert meta["isolated"] == 30 and meta["isolation_precision"] >= 0.9
