"""Stage 6: Neural Cleanse (Wang et al. 2019) on the calibration split.

For every label t, find the smallest mask m and pattern P such that x' = (1 - m) * x + m * P sends clean
images to t: minimise CE(f(x'), t) + cost_t * |m|_1, with m = tanh(a)/2 + 1/2, P = tanh(b)/2 + 1/2 (the
model's own [0, 1] pixel range, the trap noted on the original repository). All labels are optimised in
one batch: Adam is element-wise and the losses do not share parameters, so this equals separate runs at a
tenth of the Python overhead. Cost schedule as the original: start at init_cost, x2 after `patience`
rounds at >= 99% attack success, / 2^1.5 after `patience` rounds below it. A round is `round_steps` steps
(the original's epoch over its data); the run stops after `steps` or when every label's best norm has not
improved by 1% for `early_stop_patience` rounds.

A label is infected when its best mask's L1 norm lies below the median and its anomaly index
|L1 - median| / (1.4826 * MAD) exceeds 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.attacks import stamp
from training.common import predict, progress, setup_torch, to_jsonable, write_json

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal's standard deviation


@dataclass(frozen=True)
class NeuralCleanseConfig:
    steps: int = 400  # optimisation steps at most (all labels at once)
    batch_size: int = 32  # clean images per label per step (original: 32)
    lr: float = 0.1  # Adam learning rate (original)
    betas: tuple[float, float] = (0.5, 0.9)  # Adam betas (original)
    init_cost: float = 1e-3  # initial weight of |m|_1 (original)
    cost_up: float = 2.0  # cost multiplier when the attack succeeds (original)
    cost_down: float = 2.0**1.5  # cost divisor when it fails (original)
    patience: int = 5  # rounds before a cost change (original)
    round_steps: int = 10  # steps per round (the original's epoch)
    attack_threshold: float = 0.99  # attack success a mask must reach to count (original)
    early_stop_patience: int = 10  # rounds without a 1% better norm before stopping
    anomaly_threshold: float = 2.0  # anomaly index above which a small-norm label is infected
    neuron_share: float = 0.01  # share of penultimate neurons kept for the activation filter (top 1%)
    seed: int = 0


@dataclass
class NeuralCleanseResult:
    masks: np.ndarray  # float32 (L, H, W), best mask per label
    patterns: np.ndarray  # float32 (L, C, H, W), its pattern, one plane per image channel
    l1_norms: np.ndarray  # (L,) L1 norm of each best mask, pixels
    attack_success: np.ndarray  # (L,) share of calibration images the reversed trigger sends to the label
    anomaly_index: np.ndarray  # (L,)
    flagged_labels: list[int]
    activation_neurons: dict[int, list[int]] = field(default_factory=dict)  # label -> neuron indices

    def summary(self) -> dict[str, object]:
        return to_jsonable(
            {
                "l1_norms": self.l1_norms.round(4).tolist(),
                "attack_success": self.attack_success.round(4).tolist(),
                "anomaly_index": self.anomaly_index.round(4).tolist(),
                "flagged_labels": self.flagged_labels,
                "activation_neurons": self.activation_neurons,
            }
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, masks=self.masks, patterns=self.patterns)
        write_json(path.with_suffix(".json"), self.summary())

    @classmethod
    def load(cls, path: Path) -> NeuralCleanseResult:
        import json

        arrays = np.load(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        return cls(
            masks=arrays["masks"],
            # scans saved before colour support hold grayscale (L, H, W) patterns
            patterns=arrays["patterns"][:, None] if arrays["patterns"].ndim == 3 else arrays["patterns"],
            l1_norms=np.array(meta["l1_norms"]),
            attack_success=np.array(meta["attack_success"]),
            anomaly_index=np.array(meta["anomaly_index"]),
            flagged_labels=list(meta["flagged_labels"]),
            activation_neurons={int(k): v for k, v in meta["activation_neurons"].items()},
        )


def anomaly_index(norms: np.ndarray) -> np.ndarray:
    """|x - median| / (1.4826 * MAD); with MAD = 0 a norm off the median is infinitely anomalous."""
    median = np.median(norms)
    deviation = np.abs(norms - median)
    mad = MAD_CONSISTENCY * np.median(deviation)
    if mad == 0:
        return np.where(deviation == 0, 0.0, np.inf)
    return deviation / mad


def flagged(norms: np.ndarray, index: np.ndarray, threshold: float) -> list[int]:
    """Labels whose norm is below the median and whose anomaly index exceeds the threshold."""
    return [int(t) for t in np.flatnonzero((norms < np.median(norms)) & (index > threshold))]


def _to_param(values: np.ndarray) -> torch.Tensor:
    """[0, 1] values -> tanh parametrisation a with tanh(a)/2 + 1/2 = values."""
    return torch.atanh(torch.from_numpy((values - 0.5) * (2 - 1e-6)).float()).requires_grad_(True)


def reverse_engineer(
    model: nn.Module, images: np.ndarray, num_classes: int, config: NeuralCleanseConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (mask, pattern) per label and its L1 norm: float32 (L, H, W), (L, C, H, W), (L,). The mask is one
    plane for all channels (its L1 norm counts pixels, as the original's does); the pattern has a colour."""
    setup_torch(config.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    rng = np.random.default_rng(config.seed)
    n_labels, (channels, height, width) = num_classes, images.shape[1:]
    mask_param = _to_param(rng.random((n_labels, 1, height, width)))
    pattern_param = _to_param(rng.random((n_labels, channels, height, width)))
    opt = torch.optim.Adam([mask_param, pattern_param], lr=config.lr, betas=config.betas)
    targets = torch.arange(n_labels).repeat_interleave(config.batch_size)  # (L * B,)
    x_all = torch.from_numpy(images)

    cost = np.full(n_labels, config.init_cost)
    up = np.zeros(n_labels, int)
    down = np.zeros(n_labels, int)
    best_l1 = np.full(n_labels, np.inf)
    best_mask = np.zeros((n_labels, height, width), np.float32)
    best_pattern = np.zeros((n_labels, channels, height, width), np.float32)
    stop_best = np.full(n_labels, np.inf)
    stale = 0
    hits = np.zeros(n_labels)
    for step in progress(range(config.steps), "neural-cleanse"):
        idx = torch.from_numpy(rng.integers(0, len(images), n_labels * config.batch_size))
        mask = torch.tanh(mask_param) / 2 + 0.5  # (L, 1, H, W)
        pattern = torch.tanh(pattern_param) / 2 + 0.5
        x = x_all[idx].view(n_labels, config.batch_size, channels, height, width)
        stamped = stamp(x, mask[:, None], pattern[:, None]).view(-1, channels, height, width)
        logits = model(stamped)[0]  # (L * B, C)
        ce = F.cross_entropy(logits, targets, reduction="none").view(n_labels, -1).mean(1)
        l1 = mask.flatten(1).sum(1)  # (L,)
        loss = (ce + torch.from_numpy(cost).float() * l1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hits += (logits.argmax(1) == targets).view(n_labels, -1).float().mean(1).numpy()

        if (step + 1) % config.round_steps:
            continue
        # One round done: the original's end-of-epoch bookkeeping, per label.
        success = hits / config.round_steps
        hits[:] = 0
        norms = l1.detach().numpy()
        better = (success >= config.attack_threshold) & (norms < best_l1)
        best_l1[better] = norms[better]
        best_mask[better] = mask.detach()[better, 0].numpy()
        best_pattern[better] = pattern.detach()[better].numpy()
        passing = success >= config.attack_threshold
        up = np.where(passing, up + 1, 0)
        down = np.where(passing, 0, down + 1)
        cost = np.where(up >= config.patience, cost * config.cost_up, cost)
        cost = np.where(down >= config.patience, cost / config.cost_down, cost)
        up[up >= config.patience] = 0
        down[down >= config.patience] = 0
        improved = np.isfinite(best_l1) & (best_l1 < 0.99 * stop_best)
        stale = 0 if improved.any() or not np.isfinite(best_l1).all() else stale + 1
        stop_best = np.minimum(stop_best, best_l1)
        if stale >= config.early_stop_patience:
            break

    # A label whose trigger never reached the threshold keeps its last mask, so its norm stays honest.
    final_mask = (torch.tanh(mask_param) / 2 + 0.5).detach()[:, 0].numpy()
    final_pattern = (torch.tanh(pattern_param) / 2 + 0.5).detach().numpy()
    missing = ~np.isfinite(best_l1)
    best_mask[missing], best_pattern[missing] = final_mask[missing], final_pattern[missing]
    best_l1[missing] = final_mask[missing].sum(axis=(1, 2))
    return best_mask, best_pattern, best_l1


def top_neurons(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, mask: np.ndarray, pattern: np.ndarray,
    target: int, share: float,
) -> list[int]:  # fmt: skip
    """Penultimate neurons the reversed trigger raises most above clean activations (the top `share`)."""
    others = images[labels != target]
    clean = predict(model, others)[1]  # (N, D)
    triggered = predict(model, stamp(others, mask, pattern))[1]
    gap = triggered.mean(0) - clean.mean(0)
    k = max(1, math.ceil(share * gap.size))
    return [int(i) for i in np.argsort(-gap)[:k]]


def run_neural_cleanse(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int, config: NeuralCleanseConfig
) -> NeuralCleanseResult:
    """Scan every label, flag the outliers, pick the activation-filter neurons."""
    masks, patterns, norms = reverse_engineer(model, images, num_classes, config)
    logits = np.stack([predict(model, stamp(images, masks[t], patterns[t]))[0] for t in range(num_classes)])
    success = (logits.argmax(2) == np.arange(num_classes)[:, None]).mean(1)
    index = anomaly_index(norms)
    infected = flagged(norms, index, config.anomaly_threshold)
    # Activation filter: every flagged label, or the most suspicious (smallest norm) when none is flagged.
    watch = infected or [int(np.argmin(norms))]
    neurons = {t: top_neurons(model, images, labels, masks[t], patterns[t], t, config.neuron_share) for t in watch}
    return NeuralCleanseResult(masks, patterns, norms, success, index, infected, neurons)
