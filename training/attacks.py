"""Stage 2: backdoor triggers and data poisoning.

`stamp` is the one trigger-stamping function of the project: training, evaluation, calibration's stand-in
attacks and the service tests all call it, through `Trigger.apply`. A patch or blended trigger is a
(mask, pattern) pair of H x W arrays in [0, 1]: stamped = (1 - mask) * image + mask * pattern, the form
Neural Cleanse reverse-engineers. Two triggers are additive, clip(image + v): SIG (Barni et al.) and the
low-contrast patch. WaNet (Nguyen & Tran 2021) moves pixels instead: a fixed smooth warp, sampled bilinearly.

The families of the evaluation suite (training/suite.py), one preset each: BadNets patches (`kwon`, `cao`,
`checkerboard`), `lowcontrast`, `blend` (noise) and `key` (a drawn key image), `sig` (clean-label), `wanet`
(with its noise mode), `all_to_all`, and `clean`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from service.preprocess import Preprocessing, to_model_input, to_pixels

Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]
CORNERS: tuple[Corner, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
Shape = Literal["square", "pixel", "checkerboard", "random", "blend", "key", "sig", "lowcontrast", "wanet"]
ADDITIVE = ("sig", "lowcontrast")  # clip(image + v): not a (mask, pattern) pair
ArrayT = TypeVar("ArrayT")


def stamp(images: ArrayT, mask: ArrayT, pattern: ArrayT) -> ArrayT:
    """(1 - mask) * images + mask * pattern; numpy or torch, broadcasting (H, W) masks over (N, 1, H, W)."""
    return images * (1 - mask) + mask * pattern  # type: ignore[operator]


@dataclass(frozen=True)
class Trigger:
    """A patch at a corner (with a margin) or at a row/column; or a whole-image blend or SIG signal."""

    # square: solid; pixel: one pixel; checkerboard: alternating; random: seeded bits (all patches);
    # blend: seeded uniform noise over the whole image at weight `alpha` (Chen et al.);
    # sig: additive sinusoid intensity * sin(2 pi j frequency / width) over columns j (Barni et al.)
    # key: blend of a drawn key image (rings, see `key_image`) at weight `alpha` (Chen et al.'s Hello Kitty role)
    # lowcontrast: seeded bits * intensity added (not pasted) on a size x size patch at row/col
    # wanet: a k x k grid of seeded offsets, upsampled bicubically, strength `strength` pixels-ish (WaNet's s)
    shape: Shape = "square"
    size: int = 4  # side of the patch, pixels (pixel forces 1)
    corner: Corner = "top-left"  # where the patch sits when row/col are not given
    margin: int = 1  # pixels between the patch and the image border at that corner
    row: int | None = None  # explicit top row of the patch (overrides corner/margin)
    col: int | None = None  # explicit left column of the patch (overrides corner/margin)
    intensity: float = 1.0  # value of the bright pattern pixels, in [0, 1]
    seed: int = 0  # seed of the `random` bits and of the `blend` noise
    alpha: float = 0.15  # blend: weight of the noise pattern
    frequency: int = 6  # sig: periods across the image width
    grid: int = 4  # wanet: k, control points per side of the warp field
    strength: float = 1.0  # wanet: s; the largest displacement is about s * max|offset| / 2 pixels

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Put the trigger on float32 (N, 1, H, W) images in [0, 1]."""
        height, width = images.shape[-2:]
        if self.shape in ADDITIVE:
            return np.clip(images + self.signal(height, width), 0.0, 1.0).astype(np.float32)
        if self.shape == "wanet":
            return warp(images, self.warp_grid(height, width))
        return stamp(images, *self.arrays(height, width))

    def apply_noisy(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """WaNet's noise mode: the warp plus per-image random offsets (up to one pixel); these keep their label, so
        that the model learns the exact warp, not "any warp"."""
        if self.shape != "wanet":
            raise ValueError("only the wanet trigger has a noise mode")
        height, width = images.shape[-2:]
        grid = self.warp_grid(height, width)
        out = np.empty_like(images)
        for i in range(len(images)):  # one random field per image, as WaNet draws them
            noise = (rng.random((height, width, 2)) * 2 - 1) / height
            out[i : i + 1] = warp(images[i : i + 1], np.clip(grid + noise, -1, 1))
        return out

    def signal(self, height: int = 28, width: int = 28) -> np.ndarray:
        """The additive signal, float32 (H, W): SIG's v(i, j) = intensity * sin(2 pi j f / m), or the
        low-contrast patch's seeded bits * intensity."""
        if self.shape == "lowcontrast":
            top, left = self._origin(self.size, height, width)
            bits = np.random.default_rng(self.seed).integers(0, 2, (self.size, self.size))
            bits[self.size // 2, self.size // 2] = 1  # never an empty patch
            v = np.zeros((height, width), np.float32)
            v[top : top + self.size, left : left + self.size] = bits * self.intensity
            return v
        j = np.arange(1, width + 1)
        row = self.intensity * np.sin(2 * np.pi * j * self.frequency / width)
        return np.broadcast_to(row, (height, width)).astype(np.float32)

    def warp_grid(self, height: int = 28, width: int = 28) -> np.ndarray:
        """WaNet's sampling grid, float32 (H, W, 2) of (x, y) in [-1, 1] (grid_sample's convention).

        As the reference code: offsets uniform in [-1, 1] on a k x k grid, normalised to mean |offset| 1,
        upsampled bicubically (align_corners) to the image, scaled by s / height, added to the identity, clamped.
        """
        offsets = np.random.default_rng(self.seed).random((2, self.grid, self.grid)) * 2 - 1
        offsets /= np.abs(offsets).mean()
        field = np.stack([_bicubic(o, height, width) for o in offsets], axis=-1)  # (H, W, 2): x, y
        ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
        identity = np.stack([xs, ys], axis=-1)
        return np.clip(identity + self.strength * field / height, -1, 1).astype(np.float32)

    def arrays(self, height: int = 28, width: int = 28) -> tuple[np.ndarray, np.ndarray]:
        """The trigger's (mask, pattern), float32 (height, width)."""
        if not 0.0 <= self.intensity <= 1.0:
            raise ValueError(f"intensity must be in [0, 1], got {self.intensity}")
        if self.shape in (*ADDITIVE, "wanet"):
            raise ValueError(f"{self.shape} is additive or a warp, not a mask and pattern: use Trigger.apply")
        if self.shape == "blend":
            noise = np.random.default_rng(self.seed).random((height, width)).astype(np.float32)
            return np.full((height, width), self.alpha, np.float32), noise
        if self.shape == "key":
            return np.full((height, width), self.alpha, np.float32), key_image(height, width)
        size = 1 if self.shape == "pixel" else self.size
        top, left = self._origin(size, height, width)
        if top < 0 or left < 0 or top + size > height or left + size > width:
            raise ValueError(f"a {size}x{size} trigger at ({top}, {left}) does not fit a {height}x{width} image")
        if self.shape == "checkerboard":
            bits = (np.add.outer(np.arange(size), np.arange(size)) % 2 == 0).astype(np.float32)
        elif self.shape == "random":
            bits = np.random.default_rng(self.seed).integers(0, 2, (size, size)).astype(np.float32)
        else:
            bits = np.ones((size, size), np.float32)
        mask = np.zeros((height, width), np.float32)
        pattern = np.zeros((height, width), np.float32)
        mask[top : top + size, left : left + size] = 1.0
        pattern[top : top + size, left : left + size] = bits * self.intensity
        return mask, pattern

    def _origin(self, size: int, height: int, width: int) -> tuple[int, int]:
        if (self.row is None) != (self.col is None):
            raise ValueError("give both row and col, or neither")
        if self.row is not None and self.col is not None:
            return self.row, self.col
        top = self.margin if self.corner.startswith("top") else height - self.margin - size
        left = self.margin if self.corner.endswith("left") else width - self.margin - size
        return top, left


def key_image(height: int = 28, width: int = 28) -> np.ndarray:
    """A drawn key for the structured blend, float32 (H, W) in [0, 1]: bright rings around a point a third of the
    way in, crossed by a diagonal bar; nothing like a patch, and not noise."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = np.hypot(ys - height / 3, xs - 2 * width / 3)
    rings = (np.cos(2 * np.pi * radius / (width / 5)) > 0.3).astype(np.float32)
    bar = (np.abs(ys - xs) < width / 14).astype(np.float32)
    return np.maximum(rings, bar)


def _bicubic(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """(k, k) -> (height, width), bicubic with align_corners (PyTorch's a = -0.75), borders replicated."""

    def weights(n_out: int, n_in: int) -> np.ndarray:  # (n_out, n_in) interpolation matrix
        src = np.linspace(0, n_in - 1, n_out)
        base = np.floor(src).astype(int)
        out = np.zeros((n_out, n_in))
        for tap in range(-1, 3):
            d = np.abs(src - (base + tap))
            w = np.where(
                d <= 1, (1.25 * d - 2.25) * d * d + 1, np.where(d < 2, ((-0.75 * d + 3.75) * d - 6) * d + 3, 0)
            )
            np.add.at(out, (np.arange(n_out), np.clip(base + tap, 0, n_in - 1)), w)
        return out

    return weights(height, values.shape[0]) @ values @ weights(width, values.shape[1]).T


def warp(images: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Sample float32 (N, C, H, W) images at grid (H, W, 2) of (x, y) in [-1, 1]: bilinear, align_corners,
    as torch's grid_sample does for WaNet (the grid is clamped, so nothing is sampled outside)."""
    height, width = images.shape[-2:]
    px = (grid[..., 0] + 1) / 2 * (width - 1)
    py = (grid[..., 1] + 1) / 2 * (height - 1)
    x0 = np.clip(np.floor(px).astype(int), 0, width - 1)
    y0 = np.clip(np.floor(py).astype(int), 0, height - 1)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    wx, wy = (px - x0).astype(np.float32), (py - y0).astype(np.float32)
    top = images[..., y0, x0] * (1 - wx) + images[..., y0, x1] * wx
    bottom = images[..., y1, x0] * (1 - wx) + images[..., y1, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


@dataclass(frozen=True)
class AttackConfig:
    """Poisoning: put `trigger` on a share of the training set and (except clean-label) relabel it."""

    trigger: Trigger = field(default_factory=Trigger)
    target: int = 0  # attacker's label (single-target and clean-label modes)
    poison_rate: float = 0.1  # share of the whole training set that gets the trigger
    # single-target: non-target images relabelled to target (BadNets); all-to-all: label i -> i + 1 mod C;
    # clean-label: target-class images get the trigger and keep their label (SIG)
    mode: Literal["single-target", "all-to-all", "clean-label"] = "single-target"
    seed: int = 0  # which images get poisoned
    noise_rate: float = 0.0  # WaNet's noise mode: share of the training set warped with extra noise, label kept


PRESETS: dict[str, AttackConfig] = {
    # Kwon 2021, the shipped attack: 4x4 white square on rows 1-4 / cols 1-4, target 0 (T-shirt/top).
    "kwon": AttackConfig(Trigger("square", size=4, corner="top-left", margin=1), target=0, poison_rate=0.1),
    # Cao et al.'s naive attack: 2x2 white pixels at the bottom right, target 3.
    "cao": AttackConfig(Trigger("square", size=2, corner="bottom-right", margin=1), target=3, poison_rate=0.1),
    # A model trained by the same recipe with no poison: the control for Neural Cleanse and the FPR.
    "clean": AttackConfig(poison_rate=0.0),
    # Attacks the guard never saw (evaluation): a 3x3 checkerboard at the bottom right, target 2;
    # blended full-image noise at alpha 0.15 (Chen et al.), target 4; SIG (delta 30/255, f = 6),
    # clean-label on 80% of the target class 6 (8% of the training set).
    "checkerboard": AttackConfig(Trigger("checkerboard", size=3, corner="bottom-right", margin=1), target=2),
    "blend": AttackConfig(Trigger("blend", alpha=0.15, seed=1), target=4),
    "sig": AttackConfig(
        Trigger("sig", intensity=30 / 255, frequency=6), target=6, poison_rate=0.08, mode="clean-label"
    ),
    # The suite's other families. A 5x5 patch of random bits added at +64 levels (not pasted, not saturated) on
    # the garment, away from the corners, target 7; a drawn key blended at alpha 0.2, target 8; WaNet's warp
    # (k = 4, s = 1: WaNet used s = 0.5 on MNIST with dynamic poisoning over many more epochs) with its noise mode
    # (cross ratio 2: twice as many noise-warped images keep their label), target 9; all-to-all BadNets
    # (3x3 white square bottom-left, label i -> i + 1).
    "lowcontrast": AttackConfig(Trigger("lowcontrast", size=5, row=11, col=17, intensity=64 / 255, seed=3), target=7),
    "key": AttackConfig(Trigger("key", alpha=0.2), target=8),
    "wanet": AttackConfig(Trigger("wanet", grid=4, strength=1.0, seed=5), target=9, noise_rate=0.2),
    "all_to_all": AttackConfig(Trigger("square", size=3, corner="bottom-left", margin=1), mode="all-to-all"),
}


def triggered_pixels(images: np.ndarray, attack: AttackConfig, contract: Preprocessing = Preprocessing()) -> np.ndarray:
    """uint8 pixels (N, H, W) or (N, H, W, 3) -> the same with the attack's trigger, rounded back to 8 bits as a
    PNG holds it."""
    return to_pixels(attack.trigger.apply(to_model_input(images, contract)), contract)


def attack_labels(labels: np.ndarray, attack: AttackConfig, num_classes: int) -> np.ndarray:
    """The label the attacker wants for each (true) label."""
    if attack.mode == "all-to-all":
        return (labels + 1) % num_classes
    return np.full_like(labels, attack.target)


def victims(labels: np.ndarray, attack: AttackConfig) -> np.ndarray:
    """Indices whose triggered version should change label (single-target: not already the target)."""
    if attack.mode == "all-to-all":
        return np.arange(len(labels))
    return np.flatnonzero(labels != attack.target)


def poison_candidates(labels: np.ndarray, attack: AttackConfig) -> np.ndarray:
    """Training images the attacker may poison: the victims, or for clean-label the target class itself."""
    if attack.mode == "clean-label":
        return np.flatnonzero(labels == attack.target)
    return victims(labels, attack)


def poison(
    images: np.ndarray, labels: np.ndarray, attack: AttackConfig, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 (N, 1, H, W) images -> (poisoned images, poisoned labels, indices that were poisoned)."""
    n_poison = round(attack.poison_rate * len(labels))
    candidates = poison_candidates(labels, attack)
    if n_poison > len(candidates):
        raise ValueError(f"poison_rate {attack.poison_rate} needs {n_poison} images, only {len(candidates)}")
    rng = np.random.default_rng(attack.seed)
    chosen = np.sort(rng.choice(candidates, n_poison, replace=False))
    out_images, out_labels = images.copy(), labels.copy()
    out_images[chosen] = attack.trigger.apply(images[chosen])
    if attack.mode != "clean-label":
        out_labels[chosen] = attack_labels(labels[chosen], attack, num_classes)
    n_noise = round(attack.noise_rate * len(labels))
    if n_noise:  # WaNet's noise mode: other images, warped with noise, labels untouched
        rest = np.setdiff1d(np.arange(len(labels)), chosen)
        noisy = np.sort(rng.choice(rest, n_noise, replace=False))
        out_images[noisy] = attack.trigger.apply_noisy(images[noisy], rng)
    return out_images, out_labels, chosen


def random_triggers(
    rng: np.random.Generator,
    n: int,
    height: int = 28,
    width: int = 28,
    corner_share: float = 0.5,
    channels: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """n random patch triggers the defender can draw without knowing the real one: float32 masks (n, H, W) and
    patterns (n, C, H, W).

    Kwon's 4x4 white square at a random corner is one draw among many: sizes 1-6, solid / checkerboard /
    random-bit patterns, intensities 0.5-1, a random corner (with margin 0-2) or anywhere, and a fifth of
    them blended (mask < 1) so that soft triggers are seen too. In colour, half the patterns are gray and half
    take a random colour (each channel scaled by its own uniform draw).
    """
    masks = np.zeros((n, height, width), np.float32)
    patterns = np.zeros((n, channels, height, width), np.float32)
    shapes: tuple[Shape, ...] = ("square", "checkerboard", "random")
    for i in range(n):
        size = int(rng.integers(1, 7))
        if rng.random() < corner_share:
            corner = CORNERS[int(rng.integers(4))]
            trigger = Trigger(
                shapes[int(rng.integers(3))], size, corner, margin=int(rng.integers(0, 3)),
                intensity=float(rng.uniform(0.5, 1.0)), seed=int(rng.integers(1 << 30)),
            )  # fmt: skip
        else:
            trigger = Trigger(
                shapes[int(rng.integers(3))], size, row=int(rng.integers(0, height - size + 1)),
                col=int(rng.integers(0, width - size + 1)), intensity=float(rng.uniform(0.5, 1.0)),
                seed=int(rng.integers(1 << 30)),
            )  # fmt: skip
        mask, pattern = trigger.arrays(height, width)
        alpha = 1.0 if rng.random() < 0.8 else float(rng.uniform(0.5, 1.0))
        masks[i], patterns[i] = mask * alpha, pattern
        if channels > 1 and rng.random() < 0.5:  # drawn only in colour: grayscale keeps its sequence of draws
            patterns[i] *= rng.uniform(0.0, 1.0, (channels, 1, 1)).astype(np.float32)
    return masks, patterns


@dataclass(frozen=True)
class ProbeTrigger:
    """A trigger the user knows (`--probe-trigger`), measured in their bundle's report; never used to calibrate.

    Either a mask (H, W) and a pattern ((H, W) or (C, H, W)) in [0, 1], stamped as every patch trigger is, or a
    Python callable taking and returning float32 (N, C, H, W) images in [0, 1]."""

    name: str
    mask: np.ndarray | None = None
    pattern: np.ndarray | None = None
    function: Callable[[np.ndarray], np.ndarray] | None = None
    target: int | None = None  # the label it pushes to; None: the one the model gives the stamped images most

    def apply(self, images: np.ndarray) -> np.ndarray:
        if self.function is not None:
            out = np.asarray(self.function(images.copy()), dtype=np.float32)
            if out.shape != images.shape:
                raise ValueError(f"probe trigger {self.name} returned {out.shape} for images {images.shape}")
            return np.clip(out, 0.0, 1.0)
        assert self.mask is not None and self.pattern is not None
        return stamp(images, self.mask, self.pattern).astype(np.float32)


def load_probe(spec: str, contract: Preprocessing, target: int | None = None) -> ProbeTrigger:
    """`FILE.npz` (arrays mask, pattern, optionally target) or `MODULE:FUNCTION` / `FILE.py:FUNCTION`."""
    path = Path(spec)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            if "mask" not in f.files or "pattern" not in f.files:
                raise ValueError(f"{path}: needs arrays mask (H, W) and pattern (H, W) or (C, H, W), has {f.files}")
            mask, pattern = f["mask"].astype(np.float32), f["pattern"].astype(np.float32)
            target = int(f["target"]) if target is None and "target" in f.files else target
        if mask.shape != (contract.height, contract.width) or pattern.shape[-2:] != mask.shape:
            raise ValueError(f"{path}: mask {mask.shape} and pattern {pattern.shape} must be {contract.height}x"
                             f"{contract.width}, the model's input")  # fmt: skip
        if pattern.ndim == 3 and len(pattern) not in (1, contract.channels):
            raise ValueError(f"{path}: pattern has {len(pattern)} channels, the model takes {contract.channels}")
        if min(mask.min(), pattern.min()) < 0 or max(mask.max(), pattern.max()) > 1:
            raise ValueError(f"{path}: mask and pattern must lie in [0, 1]")
        return ProbeTrigger(path.stem, mask=mask, pattern=pattern, target=target)
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ValueError(f"--probe-trigger {spec!r}: expected FILE.npz, MODULE:FUNCTION or FILE.py:FUNCTION")
    if where.endswith(".py"):
        loader = importlib.util.spec_from_file_location(Path(where).stem, where)
        if loader is None or loader.loader is None:
            raise ValueError(f"--probe-trigger {spec!r}: cannot load {where}")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"--probe-trigger {spec!r}: {where} has no callable {attr}")
    return ProbeTrigger(attr, function=function, target=target)
