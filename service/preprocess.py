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
    # Pillow filter used when the upload is not height x width. "box" (area averaging) where the upload is an
    # integer multiple of height x width: an image upscaled by an integer factor with nearest neighbour comes back
    # exactly. At fractional ratios box falls back to bilinear (anti-aliased): Pillow's box weights are not
    # mirror-symmetric there, so an EXIF-rotated upload would not give its upright twin's pixels (up to 46 levels
    # apart, measured). Bundles built before it say "bilinear" in their manifest and keep it.
    resample: str = "box"
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


# Transposes that swap width and height (EXIF orientations 5 to 8): the resize target swaps with them.
AXIS_SWAPS = frozenset(
    {Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270}
)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # Pillow's 16-bit grayscale modes, samples 0..65535
# Modes whose alpha is composited onto black; "P", "1", "L" and "RGB" join them when they carry a transparency key.
ALPHA = ("RGBA", "LA", "PA")
PREMULTIPLIED = ("RGBa", "La")  # colour already multiplied by alpha, i.e. already composited onto black


def resize_target(contract: Preprocessing, transpose: Image.Transpose | None = None) -> tuple[int, int]:
    """(width, height) to resize to before `transpose`, so that the transposed result is the contract's size."""
    if transpose in AXIS_SWAPS:
        return contract.height, contract.width
    return contract.width, contract.height


def _premultiplied_gray(image: Image.Image) -> Image.Image:
    """ "RGBa" or "La" -> "L": the premultiplied colour (the composite onto black) in gray, alpha dropped."""
    bands = image.split()
    return bands[0] if image.mode == "La" else Image.merge("RGB", bands[:3]).convert("L")


def image_to_pixels(
    image: Image.Image,
    contract: Preprocessing = Preprocessing(),
    *,
    box: tuple[float, float, float, float] | None = None,
    transpose: Image.Transpose | None = None,
) -> np.ndarray:
    """Any Pillow image (any mode, any size) -> uint8 (H, W) grayscale at the contract's size.

    Each mode is reduced to the small size as early as its numbers allow, so a 40-megapixel upload costs at most
    one full-size copy besides its own pixels:

    - "L", "RGB", "1", "CMYK", "P" without transparency and every other mode: Pillow's convert("L"), then resize.
    - "RGBA", "LA", "PA", and "P"/"1"/"L"/"RGB" with a transparency key: alpha composited onto black (the datasets'
      background) by premultiplying at full size, then resize, then gray from the premultiplied colour.
    - "RGBa", "La": premultiplied colour is already the composite on black: alpha is dropped.
    - "I;16*": 16-bit samples, resized at 16 bits, then scaled by 1/257 (65535 -> 255), rounded.
    - "I", "F": Pillow's convention, 0..255 levels rounded and clipped (a 16-bit PNG that older Pillow versions
      open as "I" is the caller's to convert: service.decode does).

    box: the region of `image` that holds the picture (Pillow's resize box; a JPEG decoded at a reduced scale
    covers a fractional size). transpose (from EXIF orientation) is applied last, to the small image: resizing to
    the swapped size and then transposing equals transposing and then resizing, without a full-size copy.
    """
    size = resize_target(contract, transpose)
    resample = Image.Resampling[contract.resample.upper()]

    def small(im: Image.Image) -> Image.Image:
        if im.size == size and box is None:
            return im
        integer = box is None and im.width % size[0] == 0 and im.height % size[1] == 0
        chosen = Image.Resampling.BILINEAR if resample == Image.Resampling.BOX and not integer else resample
        return im.resize(size, resample=chosen, box=box)

    mode = image.mode
    if mode in SIXTEEN_BIT:
        levels = np.asarray(small(image)).astype(np.float32) / np.float32(257)
        gray = Image.fromarray(np.rint(levels).astype(np.uint8), mode="L")
    elif mode in PREMULTIPLIED:
        gray = small(_premultiplied_gray(image))  # these modes only exist in memory, never straight from a file
    elif mode in ALPHA or (mode in ("P", "1", "L", "RGB") and "transparency" in image.info):
        if mode not in ("RGBA", "LA"):
            image = image.convert("RGBA")  # applies the palette's or the key colour's transparency
        # Premultiplied colour is the composite onto black: premultiply at full size, shrink, then drop alpha
        # and take gray on the small image. Peak: the decoded pixels plus one premultiplied copy (8 bytes a pixel
        # for RGBA). convert and resize release the GIL; getchannel, split and paste on the full-size image hold
        # it for tens of milliseconds each, which the event loop (and /v2/health/live) would feel. Shrinking
        # before taking gray puts an opaque RGBA image within 1 level of its RGB twin, not always on it.
        gray = _premultiplied_gray(small(image.convert("RGBa" if image.mode == "RGBA" else "La")))
    else:
        gray = small(image.convert(contract.color))
    if transpose is not None:
        gray = gray.transpose(transpose)
    return np.asarray(gray, dtype=np.uint8)
