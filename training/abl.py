"""Anti-Backdoor Learning (Li et al. 2021): train a cleaner classifier on a poisoned training set.

A training-time defense, `python -m training classifier --defense abl`. Backdoor examples are learned much faster
than clean ones, so ABL:
1. isolation: trains a few epochs with the flooded loss sign(CE - gamma) * CE (its local gradient ascent, LGA),
   which holds the batch loss near gamma: clean examples stay near it while backdoor examples fall far below;
2. isolates the lowest-loss share (1%) of the training set as suspected poison;
3. trains on the rest with plain cross-entropy (the rest may still hold poison: step 4 removes what it teaches);
4. unlearns: gradient ascent on the isolated examples (minimise -CE) at a small learning rate, which unlearns the
   trigger the model associates with their label, for every example that carries it.
The defender never knows which examples were poisoned; `poisoned` indices are used only to report how precise the
isolation was. All phases share the classifier's training step (training.classifier.train_epoch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.classifier import ClassifierConfig, build_classifier, train_epoch
from training.common import predict, setup_torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ABLConfig:
    isolation_epochs: int = 5  # passes over the whole (poisoned) training set with the flooded loss
    gamma: float = 0.5  # flooding level of the isolation loss, in nats of mean batch cross-entropy (ABL: 0.5)
    isolation_share: float = 0.01  # share of the training set isolated as the lowest-loss examples (ABL: 1%)
    # passes with plain cross-entropy over the rest; None: the classifier's epochs minus isolation_epochs (at least
    # 1), so that ABL costs as many full passes as plain training (unlearning passes over only the isolated 1%)
    clean_epochs: int | None = None
    unlearn_epochs: int = 5  # passes of gradient ascent over the isolated examples (ABL: 5)
    # Adam learning rate of unlearning, constant. ABL used SGD at 5e-4, which cannot leave a saturated loss: measured
    # on a kwon-cnn, the isolated examples' CE was ~4e-5: SGD ascent did not move for 5 epochs, then went to NaN.
    unlearn_lr: float = 5e-4
    seed: int | None = None  # weight init, batch order; None: the classifier's seed

    def __post_init__(self) -> None:
        if not 0.0 <= self.isolation_share < 1.0:
            raise ValueError(f"isolation_share must be in [0, 1), got {self.isolation_share}")
        if self.gamma < 0 or self.unlearn_lr <= 0:
            raise ValueError(f"gamma must be >= 0 and unlearn_lr > 0, got {self.gamma}, {self.unlearn_lr}")
        epochs = (self.isolation_epochs, self.unlearn_epochs, self.clean_epochs or 0)
        if min(epochs) < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")

    def resolved(self, classifier: ClassifierConfig) -> ABLConfig:
        """The fields left to the classifier's config, filled in: what a checkpoint records."""
        clean = max(1, classifier.epochs - self.isolation_epochs) if self.clean_epochs is None else self.clean_epochs
        return replace(self, clean_epochs=clean, seed=classifier.seed if self.seed is None else self.seed)


def flooded_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """ABL's LGA: sign(CE - gamma) * CE of the batch mean; descends above gamma, ascends below it."""
    loss = F.cross_entropy(logits, labels)
    return torch.sign(loss - gamma) * loss


def ascent_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-CE: minimising it is gradient ascent on the cross-entropy (unlearning)."""
    return -F.cross_entropy(logits, labels)


@torch.no_grad()
def per_example_loss(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of each example, float32 (N,), in eval mode (no dropout)."""
    logits = torch.from_numpy(predict(model, images)[0])
    return F.cross_entropy(logits, torch.from_numpy(labels), reduction="none").numpy()


def isolate(losses: np.ndarray, share: float) -> np.ndarray:
    """Indices of the round(share * N) lowest losses, sorted by index."""
    k = round(share * len(losses))
    return np.sort(np.argsort(losses, kind="stable")[:k])


def agreement(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of examples the model gives their (training) label; nan when there are none."""
    return float((predict(model, images)[0].argmax(1) == labels).mean()) if len(labels) else float("nan")


def unlearn(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, epochs: int, lr: float, batch_size: int,
    rng: np.random.Generator,
) -> nn.Module:  # fmt: skip
    """Gradient ascent on (images (N, 1, H, W), labels (N,)) in place with Adam at a constant lr; eval mode after."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    for epoch in range(epochs if len(labels) else 0):
        train_epoch(model, x, y, opt, batch_size, rng, f"abl unlearning epoch {epoch + 1}", ascent_loss)
    # Ascent is unbounded: a diverged model must not be saved as if it were a defended one.
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise RuntimeError("ABL unlearning diverged (non-finite weights): lower unlearn_lr or unlearn_epochs")
    return model.eval()


def train_abl(
    images: np.ndarray, labels: np.ndarray, classifier_config: ClassifierConfig, abl_config: ABLConfig,
    num_classes: int = 10, poisoned: np.ndarray | None = None,
) -> tuple[nn.Module, dict[str, float]]:  # fmt: skip
    """Train `classifier_config.arch` on float32 images (N, 1, H, W) with labels (N,) by ABL. `poisoned`: the
    indices the attacker poisoned, used only to report the isolation's precision and recall. Returns the model
    in eval mode and facts: the isolated count, the median loss of all examples and the largest of the isolated
    after isolation, the model's agreement with the isolated labels before and after unlearning, and with
    `poisoned` isolation_precision (share of the isolated that were poisoned) and isolation_recall (share of the
    poisoned that were isolated)."""
    cfg = abl_config.resolved(classifier_config)
    assert cfg.seed is not None and cfg.clean_epochs is not None  # resolved
    setup_torch(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_classifier(classifier_config.arch, num_classes, classifier_config.dropout, images.shape[1:])
    batch_size, lr = classifier_config.batch_size, classifier_config.lr
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)

    opt = torch.optim.Adam(model.parameters(), lr=lr)  # constant lr: the flooding level does the regulating
    flood = partial(flooded_loss, gamma=cfg.gamma)
    for epoch in range(cfg.isolation_epochs):
        train_epoch(model, x_all, y_all, opt, batch_size, rng, f"abl isolation epoch {epoch + 1}", flood)
    losses = per_example_loss(model, images, labels)
    isolated = isolate(losses, cfg.isolation_share)
    rest = torch.from_numpy(np.setdiff1d(np.arange(len(labels)), isolated))

    # The rest, as train_classifier trains: Adam with a one-cycle schedule, continuing from the isolation model.
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = max(1, cfg.clean_epochs * -(-len(rest) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.15)
    x_rest, y_rest = x_all[rest], y_all[rest]
    for epoch in range(cfg.clean_epochs):
        train_epoch(model, x_rest, y_rest, opt, batch_size, rng, f"abl clean epoch {epoch + 1}", sched=sched)

    x_iso, y_iso = images[isolated], labels[isolated]
    before = agreement(model, x_iso, y_iso)
    unlearn(model, x_iso, y_iso, cfg.unlearn_epochs, cfg.unlearn_lr, batch_size, rng)
    facts: dict[str, float] = {"isolated": len(isolated), "isolation_median_loss": float(np.median(losses))}
    if len(isolated):  # a tiny set can isolate none: then nothing below is defined
        facts["isolated_loss_max"] = float(losses[isolated].max())
        facts["isolated_agreement_before_unlearning"] = before
        facts["isolated_agreement_after_unlearning"] = agreement(model, x_iso, y_iso)
    if poisoned is not None:
        hits = int(np.isin(isolated, poisoned).sum())
        if len(isolated):
            facts["isolation_precision"] = hits / len(isolated)
        if len(poisoned):  # a clean control has no poison to recall
            facts["isolation_recall"] = hits / len(poisoned)
    log.info("abl: %s", {k: round(v, 4) for k, v in facts.items()})
    return model.eval(), facts
