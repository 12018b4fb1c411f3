"""Stages 4-5: the two restoration autoencoders, both trained on clean images only.

- De-trigger AE (Kwon 2021): input = clean image with a random trigger stamped on it (see
  `attacks.random_triggers`), target = the clean image, L2 loss. Kwon's MLP (784-250-100-20) bottlenecks
  everything through 20 numbers and loses the detail the classifier needs (~68% clean accuracy after
  restoration on Fashion-MNIST), so ours is a small U-Net that predicts a residual: identity is easy to
  learn, so clean images pass almost unchanged, and the skip paths keep detail.
- Masked AE (Cao et al.): input = image with a random 50% of its 4x4 patches hidden (plus the visibility
  mask as a second channel), target = the whole image, MSE. Restoration policy at inference: two passes
  with complementary patch checkerboards; every pixel is taken from the pass in which its patch was
  hidden, i.e. inpainted from its four visible neighbours, so a small trigger is replaced by context
  rather than copied. Optional 3x3 sharpening afterwards (Cao: 35.67% -> 46.83% accuracy on BadNets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.attacks import random_triggers, stamp
from training.common import minibatches, progress, setup_torch

SHARPEN_KERNEL = ((0.0, -1.0, 0.0), (-1.0, 5.0, -1.0), (0.0, -1.0, 0.0))


@dataclass(frozen=True)
class DetriggerConfig:
    epochs: int = 5  # passes over the clean training images
    batch_size: int = 128  # Kwon
    lr: float = 1e-3  # Adam, cosine-decayed (Kwon: Adam 1e-3)
    trigger_share: float = 0.6  # share of each batch that gets a random trigger; the rest teaches identity
    corner_share: float = 0.5  # share of random triggers placed at a corner (Kwon's setting) vs anywhere
    width: int = 16  # channels of the U-Net's first level (x2, x4 below)
    seed: int = 0


@dataclass(frozen=True)
class MaskedAEConfig:
    epochs: int = 4  # passes over the clean training images
    batch_size: int = 128
    lr: float = 1e-3  # Adam, cosine-decayed
    patch: int = 4  # side of a masked patch, pixels (28 = 7 patches)
    mask_ratio: float = 0.5  # share of patches hidden during training (Cao: 0.5; 0.75 still restores)
    sharpen: bool = False  # apply the 3x3 sharpening filter after restoration (baked into the ONNX graph)
    width: int = 16
    seed: int = 0


class UNet(nn.Module):
    """C x H x W -> C x H x W, two down/up levels with skips; ~20 MFLOP at width 16 on 28x28, about one
    classifier pass. Any size: a side that is not a multiple of 4 is padded (edge-replicated) and cropped back."""

    def __init__(self, channels: int, extra: int, width: int, residual: bool) -> None:
        """channels: the image's; extra: input channels beyond the image (the masked AE's visibility mask)."""
        super().__init__()
        w1, w2, w3 = width // 2, width * 2, width * 4
        self.residual, self.channels = residual, channels
        in_channels = channels + extra

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU())

        self.enc1 = nn.Sequential(block(in_channels, w1), block(w1, w1))  # (N, w1, 28, 28)
        self.enc2 = nn.Sequential(block(w1, w2, 2), block(w2, w2))  # (N, w2, 14, 14)
        self.mid = nn.Sequential(block(w2, w3, 2), block(w3, w3))  # (N, w3, 7, 7)
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)  # -> (N, w2, 14, 14)
        self.dec2 = block(2 * w2, w2)
        self.up1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)  # -> (N, w1, 28, 28)
        self.dec1 = block(2 * w1, w1)
        self.out = nn.Conv2d(w1, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % 4, -width % 4  # Python ints at export: the padding is fixed in the graph
        padded = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
        e1 = self.enc1(padded)
        e2 = self.enc2(e1)
        d2 = self.dec2(torch.cat([self.up2(self.mid(e2)), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        y = self.out(d1)[..., :height, :width]
        # Residual: the net learns what to take away (a trigger), the image itself passes through.
        return (x[:, : self.channels] + y).clamp(0, 1) if self.residual else torch.sigmoid(y)


class DetriggerAE(UNet):
    def __init__(self, width: int = 16, channels: int = 1) -> None:
        super().__init__(channels, 0, width, residual=True)


def checkerboard_masks(height: int, width: int, patch: int) -> torch.Tensor:
    """(2, 1, H, W) visibility masks (1 = visible): a checkerboard of patches and its complement."""
    rows = torch.arange(height) // patch
    cols = torch.arange(width) // patch
    board = ((rows[:, None] + cols[None, :]) % 2).float()
    return torch.stack([board, 1 - board])[:, None]


def random_patch_masks(n: int, height: int, width: int, patch: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, H, W) visibility masks hiding a random `ratio` of patch x patch cells in each image."""
    gh, gw = -(-height // patch), -(-width // patch)
    scores = torch.rand(n, gh * gw, generator=gen)
    hidden = scores.argsort(1) < round(ratio * gh * gw)
    grid = (~hidden).float().view(n, 1, gh, gw)
    return grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :height, :width]


class MaskedAE(UNet):
    """Input (N, C + 1, H, W) = (visible pixels, visibility mask) -> the whole image."""

    def __init__(self, width: int = 16, channels: int = 1) -> None:
        super().__init__(channels, 1, width, residual=False)

    def reconstruct(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W); visible (N or 1, 1, H, W)."""
        return self(torch.cat([images * visible, visible.expand(images.shape[0], 1, -1, -1)], 1))


class MaskedRestorer(nn.Module):
    """Inference policy for the masked AE (see module doc); this is what gets exported to ONNX."""

    masks: torch.Tensor  # (2, 1, H, W) complementary visibility masks
    kernel: torch.Tensor  # (C, 1, 3, 3) sharpening filter, one per channel

    def __init__(self, ae: MaskedAE, patch: int, sharpen: bool, height: int, width: int) -> None:
        super().__init__()
        self.ae = ae
        self.sharpen = sharpen
        self.register_buffer("masks", checkerboard_masks(height, width, patch))
        self.register_buffer("kernel", torch.tensor(SHARPEN_KERNEL).view(1, 1, 3, 3).repeat(ae.channels, 1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        restored = torch.zeros_like(images)
        for visible in self.masks:  # two passes; each pixel comes from the pass that hid it
            restored = restored + (1 - visible) * self.ae.reconstruct(images, visible)
        if self.sharpen:
            restored = F.conv2d(restored, self.kernel, padding=1, groups=len(self.kernel)).clamp(0, 1)
        return restored


def _fit(model: nn.Module, epochs: int, batch_size: int, lr: float, n: int, seed: int, name: str, step) -> None:
    """The shared loop: Adam + one-cycle cosine schedule; `step(idx)` returns the batch loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-n // batch_size), pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        for idx in progress(minibatches(n, batch_size, rng), f"{name} epoch {epoch + 1}"):
            loss = step(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def train_detrigger(clean: np.ndarray, config: DetriggerConfig) -> DetriggerAE:
    """clean: float32 (N, C, H, W). Each batch: a share gets random triggers; target is always the clean image."""
    setup_torch(config.seed)
    model = DetriggerAE(config.width, clean.shape[1])
    rng = np.random.default_rng(config.seed + 1)
    x_all = torch.from_numpy(clean)
    channels, height, width = clean.shape[1:]

    def step(idx: np.ndarray) -> torch.Tensor:
        target = x_all[torch.from_numpy(idx)]
        masks, patterns = random_triggers(rng, len(idx), height, width, config.corner_share, channels)
        keep = rng.random(len(idx)) >= config.trigger_share
        masks[keep] = 0.0
        noisy = stamp(target, torch.from_numpy(masks)[:, None], torch.from_numpy(patterns))
        return F.mse_loss(model(noisy), target)

    _fit(model, config.epochs, config.batch_size, config.lr, len(clean), config.seed, "detrigger-ae", step)
    return model


def train_masked(clean: np.ndarray, config: MaskedAEConfig) -> MaskedAE:
    """clean: float32 (N, C, H, W). Hide a random share of patches, reconstruct the whole image (MSE)."""
    setup_torch(config.seed)
    model = MaskedAE(config.width, clean.shape[1])
    gen = torch.Generator().manual_seed(config.seed)
    x_all = torch.from_numpy(clean)
    height, width = clean.shape[-2:]

    def step(idx: np.ndarray) -> torch.Tensor:
        target = x_all[torch.from_numpy(idx)]
        visible = random_patch_masks(len(idx), height, width, config.patch, config.mask_ratio, gen)
        return F.mse_loss(model.reconstruct(target, visible), target)

    _fit(model, config.epochs, config.batch_size, config.lr, len(clean), config.seed, "masked-ae", step)
    return model
