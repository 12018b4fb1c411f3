"""The preprocessing contract: the one place that turns pixels into model input.

Training, calibration, evaluation, the service and the tests all call these two functions, so the model
sees exactly the same numbers whether an image comes from the IDX files or from an HTTP upload.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Preprocessing:
    """What the classifier expects; written to the manifest under `preprocessing`."""

    height: int = 28  # rows of the model input, pixels
    width: int = 28  # columns of the model input, pixels
    color: str = "L"  # Pillow mode: 8-bit grayscale; alpha is composited onto black (the datasets' background)
    resample: str = "bilinear"  # Pillow filter used when the upload is not height x width
    scale: float = 1.0 / 255.0  # uint8 -> float32 in [0, 1]
    layout: str = "NCHW"  # float32 batch x 1 x height x width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_model_input(pixels: np.ndarray, contract: Preprocessing = Preprocessing()) -> np.ndarray:
    """uint8 grayscale (H, W) or (N, H, W) -> float32 (N, 1, H, W) in [0, 1]."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    batch = pixels[None] if pixels.ndim == 2 else pixels
    if batch.ndim != 3 or batch.shape[1:] != (contract.height, contract.width):
        raise ValueError(f"expected (N, {contract.height}, {contract.width}) pixels, got {pixels.shape}")
    return (batch.astype(np.float32) * np.float32(contract.scale))[:, None]


def image_to_pixels(image: Image.Image, contract: Preprocessing = Preprocessing()) -> np.ndarray:
    """Any Pillow image (any mode, any size) -> uint8 (H, W) grayscale at the contract's size."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    gray = image.convert(contract.color)
    size = (contract.width, contract.height)
    if gray.size != size:
        resample = Image.Resampling[contract.resample.upper()]
        gray = gray.resize(size, resample=resample)
    return np.asarray(gray, dtype=np.uint8)
