"""Stage 3: the model under guard, trained on the (poisoned) training set. Kwon's Table 8 CNN by default.

The guard-building stages take any classifier that maps float32 (N, C, H, W) in [0, 1] (the bundle's
preprocessing contract; a model that wants normalised input gets the contract's mean and std put in front of it by
`load_classifier`) to (logits, features): one of ARCHS from a checkpoint, or a user's `torch.export` archive
(.pt2). The other
architectures exist so that the evaluation suite can vary the model the guard sits in front of: the guard
must assume none of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.preprocess import Preprocessing
from training.common import load_checkpoint, minibatches, predict, progress, save_checkpoint, setup_torch

ARCH = "kwon-cnn"  # the default architecture
Shape = tuple[int, ...]  # (C, H, W) of one input
GRAY_28: Shape = (1, 28, 28)  # Fashion-MNIST and MNIST
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits (N, C), labels (N,)) -> scalar loss


@dataclass(frozen=True)
class ClassifierConfig:
    arch: str = ARCH  # one of ARCHS: kwon-cnn, cao-cnn, mlp, cnn-bn
    epochs: int = 15  # passes over the training set (Kwon: 50); measured: 8 -> 90.05%, 15 -> 91.61% clean, ~6 min
    batch_size: int = 128  # Kwon Table 8
    lr: float = 1e-3  # Adam learning rate, cosine-decayed to 0 over the run
    dropout: float = 0.5  # after each fully connected layer, Kwon Table 8
    seed: int = 0  # weight init and batch order


def flat_size(conv: nn.Module, input_shape: Shape) -> int:
    """Features a convolution stack gives for one input of this shape. Nothing changes: no randomness is drawn
    (weights stay seeded) and BatchNorm's running statistics are left alone (eval mode for the probe)."""
    mode = conv.training
    with torch.no_grad():
        size = int(conv.eval()(torch.zeros(1, *input_shape)).numel())
    conv.train(mode)
    return size


class KwonCNN(nn.Module):
    """conv3x3x32, conv3x3x32, maxpool2, conv3x3x64, conv3x3x64, maxpool2, fc200, fc200, fc10 (~20 MFLOP)."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5, input_shape: Shape = GRAY_28) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.conv = nn.Sequential(
            nn.Conv2d(input_shape[0], 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        # (N, 64, 4, 4) at 28x28 -> (N, 200): the penultimate layer is `features`, post-ReLU, before the last dropout.
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(flat_size(self.conv, input_shape), 200), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(200, 200), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(200, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.fc(self.conv(x))  # (N, 200)
        return self.head(features), features


class CaoCNN(nn.Module):
    """Cao/BadNets Table 1: conv5x5x16, avgpool2, conv5x5x32, avgpool2, fc512, fc10 (ReLU; ~1.4 MFLOP)."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5, input_shape: Shape = GRAY_28) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.conv = nn.Sequential(
            nn.Conv2d(input_shape[0], 16, 5), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.AvgPool2d(2),
        )  # fmt: skip
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(flat_size(self.conv, input_shape), 512), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.fc(self.conv(x))
        return self.head(features), features


class MLP(nn.Module):
    """No convolution at all: 784-512-256-10 at 28x28 (ReLU, dropout); features are the 256 hidden units."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5, input_shape: Shape = GRAY_28) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(input_shape), 512), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(512, 256), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.fc(x)
        return self.head(features), features


class BNCNN(nn.Module):
    """A CNN with BatchNorm after every convolution: (conv3x3-BN-ReLU) x2, maxpool, x2 at 64, maxpool, fc128."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5, input_shape: Shape = GRAY_28) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.conv = nn.Sequential(
            *block(input_shape[0], 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        )  # fmt: skip
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(flat_size(self.conv, input_shape), 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.fc(self.conv(x))
        return self.head(features), features


ARCHS: dict[str, type[nn.Module]] = {"kwon-cnn": KwonCNN, "cao-cnn": CaoCNN, "mlp": MLP, "cnn-bn": BNCNN}


def build_classifier(arch: str, num_classes: int = 10, dropout: float = 0.5, input_shape: Shape = GRAY_28) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"unknown classifier architecture {arch!r}; choose from {sorted(ARCHS)}")
    return ARCHS[arch](num_classes, dropout, tuple(input_shape))


class Normalized(nn.Module):
    """A classifier that wants (x - mean) / std, fed [0, 1] images: the contract's normalisation in front of it,
    so that it goes into every ONNX copy of the model and nothing else of the guard sees normalised pixels."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, inner: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner((x - self.mean) / self.std)


def unwrap(model: nn.Module) -> nn.Module:
    """The model as it was given, without the contract's normalisation: what gets saved."""
    return model.inner if isinstance(model, Normalized) else model


class LogitsAndFeatures(nn.Module):
    """Adapts a user's exported model to (logits, features); with one output, features are the logits."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def train(self, mode: bool = True) -> LogitsAndFeatures:
        """An exported program's mode was fixed at export (it refuses .train/.eval): only record ours."""
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.inner(x)
        if isinstance(out, torch.Tensor):
            return out, out
        logits, features = out[0], out[1]
        return logits, features.flatten(1)


def train_classifier(
    images: np.ndarray, labels: np.ndarray, config: ClassifierConfig, num_classes: int = 10
) -> nn.Module:
    """Plain supervised training with Adam; the data decides whether the result carries a backdoor."""
    setup_torch(config.seed)
    model = build_classifier(config.arch, num_classes, config.dropout, images.shape[1:])
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    rng = np.random.default_rng(config.seed)
    steps = config.epochs * -(-len(labels) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps, pct_start=0.15)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    for epoch in range(config.epochs):
        train_epoch(model, x_all, y_all, opt, config.batch_size, rng, f"classifier epoch {epoch + 1}", sched=sched)
    return model.eval()


def train_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    opt: torch.optim.Optimizer,
    batch_size: int,
    rng: np.random.Generator,
    desc: str,
    loss_fn: LossFn = F.cross_entropy,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One shuffled pass minimising loss_fn(logits, labels) per batch; the one training step of every loop that
    trains a classifier (plain, ABL). Returns the mean batch loss."""
    model.train()
    total, batches = 0.0, minibatches(len(labels), batch_size, rng)
    for idx in progress(batches, desc):
        t = torch.from_numpy(idx)
        loss = loss_fn(model(images[t])[0], labels[t])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total += float(loss.detach())
    return total / max(1, len(batches))


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(model, images)[0].argmax(1) == labels).mean())


def save_classifier(path: Path, model: nn.Module, config: ClassifierConfig, **extra: object) -> None:
    num_classes = model.head[-1].out_features  # type: ignore[index,union-attr]
    input_shape = list(getattr(model, "input_shape", GRAY_28))
    save_checkpoint(path, model, config.arch, config, num_classes=num_classes, input_shape=input_shape, **extra)


def load_classifier(path: Path, contract: Preprocessing = Preprocessing()) -> nn.Module:
    """Our checkpoint (.pt) or a user's torch.export archive (.pt2) -> module giving (logits, features) on
    [0, 1] images of the contract's shape (its mean and std in front where it normalises)."""
    if path.suffix == ".pt2":
        model: nn.Module = LogitsAndFeatures(torch.export.load(str(path)).module()).eval()
        described = "x".join(map(str, contract.chw))
        probe = torch.rand(3, *contract.chw, generator=torch.Generator().manual_seed(0))
        try:  # the guard runs batches of any size: a program exported for one fixed batch cannot serve
            with torch.no_grad():
                batch, alone = model(probe)[0], model(probe[:1])[0]
        except Exception as err:
            raise ValueError(
                f"{path}: the exported program does not run on a batch of 3 images of {described} "
                f"({type(err).__name__}: {err}). If it was exported for one batch size, export it with a dynamic "
                "batch, e.g. dynamic_shapes={'x': {0: torch.export.Dim('batch')}}; if it takes another shape, pass "
                "--size/--color for it; it must return the logits (or a tuple whose first item they are)"
            ) from err
        if not torch.allclose(batch[:1], alone, rtol=1e-4, atol=1e-4):
            raise ValueError(
                f"{path}: an image's output depends on the other images in its batch (largest change "
                f"{float((batch[:1] - alone).abs().max()):.3g}): BatchNorm or dropout still in training mode? Call "
                "model.eval() before torch.export.export"
            )
    else:
        meta, state = load_checkpoint(path)
        if meta["arch"] not in ARCHS:
            raise ValueError(f"{path}: unknown classifier architecture {meta['arch']!r}")
        shape = tuple(meta.get("input_shape", GRAY_28))  # checkpoints from before other shapes: 1x28x28
        if shape != contract.chw:
            raise ValueError(f"{path}: the classifier takes {list(shape)} images, the data gives {list(contract.chw)}")
        model = build_classifier(meta["arch"], meta["num_classes"], meta["config"]["dropout"], shape)
        model.load_state_dict(state)
    model = model.eval()
    return Normalized(model, contract.mean, contract.std).eval() if contract.normalizes else model
