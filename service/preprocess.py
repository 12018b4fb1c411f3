"""The preprocessing contract: the one place that turns pixels into model input.

Training, calibration, evaluation, the service and the tests all call these two functions, so the model
sees exactly the same numbers whether an image comes from the IDX files or from an HTTP upload.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Preprocessing:
    """What the classifier expects; written to the manifest under `preprocessing`."""

    height: int = 28  # rows of the model input, pixels
    width: int = 28  # columns of the model input, pixels
    # Pillow mode of the pixels: "L" (8-bit grayscale, 1 channel) or "RGB" (3 channels); alpha is composited onto
    # black (the datasets' background).
    color: str = "L"
    # How an upload that is not height x width is brought to it. "unscale": an upload that is an integer multiple
    # (2x to 8x) of height x width and is exactly a nearest-neighbour or a bilinear upscale of some image (as
    # Pillow makes them; torch's interpolate with align_corners=False comes back too, tested; OpenCV uses the same
    # half-pixel weights, not tested here) gets that image back, to within 8-bit rounding;
    # any other goes through "box" (see `unscale`). "box": area averaging where the upload is an integer multiple,
    # which undoes a nearest-neighbour upscale exactly but leaves a bilinear one blurred. At fractional ratios both
    # fall back to bilinear (anti-aliased): Pillow's box weights are not mirror-symmetric there, so an EXIF-rotated
    # upload would not give its upright twin's pixels (up to 46 levels apart, measured). Any other Pillow filter
    # name is used as it is. Bundles built before "unscale" say "box" or "bilinear" and keep it.
    resample: str = "unscale"
    scale: float = 1.0 / 255.0  # uint8 -> float32 in [0, 1]
    layout: str = "NCHW"  # float32 batch x channels x height x width
    # The classifier's own input normalisation, (x - mean) / std per channel, on the [0, 1] input. It is folded
    # into the classifier's ONNX graph (and every copy of it: repaired, expert) at export, so every ONNX model of
    # the bundle, the autoencoders and STRIP's overlays included, takes the same [0, 1] images: the triggers, the
    # reversed triggers and the overlays all live in pixel space. Identity (0, 1) for our own models.
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.color not in COLOR_CHANNELS:
            raise ValueError(f"color must be one of {sorted(COLOR_CHANNELS)}, got {self.color!r}")
        # JSON gives lists; a frozen dataclass hashes and compares by tuples
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values, got {getattr(self, name)}")
        if any(not v > 0 for v in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def channels(self) -> int:
        return COLOR_CHANNELS[self.color]

    @property
    def chw(self) -> tuple[int, int, int]:
        """The shape of one model input."""
        return self.channels, self.height, self.width

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """The shape of one image's uint8 pixels, as numpy has them from Pillow: (H, W) or (H, W, 3)."""
        return (self.height, self.width) if self.channels == 1 else (self.height, self.width, self.channels)

    @property
    def normalizes(self) -> bool:
        return any(v != 0 for v in self.mean) or any(v != 1 for v in self.std)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}


COLOR_CHANNELS = {"L": 1, "RGB": 3}


UNSCALE = "unscale"
RESAMPLES = (UNSCALE, *(r.lower() for r in Image.Resampling.__members__))
UNSCALE_FACTORS = range(2, 9)  # integer upscales that "unscale" tries to undo
# Multiply-adds unscale may spend on one upload (bands x H x W x (h + w), twice: the solve and the check). A 28x28
# gray input never reaches it (8x: 2.8 M); a 224x224 RGB one does at 2x already (270 M) and goes through box.
UNSCALE_MAX_WORK = 1 << 27
# Largest difference, in 8-bit levels, between the upload and the bilinear upscale of what unscale recovers. The
# upscaler rounds each sample (0.5 at most) and a colour upload taken to gray rounds again, so a true bilinear
# upscale fits within about 1 level; bicubic, Lanczos and Hamming upscales miss by far more. tests/service/
# test_preprocess.py holds both sides: bilinear 2x, 3x and 5x uploads (gray, RGB, RGBA, 16-bit, torch's) come back
# within 2 levels, and bicubic, Lanczos and Hamming ones give exactly what box gives.
UNSCALE_TOLERANCE = 2.0


@lru_cache(maxsize=64)
def _bilinear(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(U, pinv(U)): U (k n, n) is Pillow's bilinear k-times upscale of one axis of n pixels (half-pixel centres,
    edge samples clamped), read off by upscaling unit impulses."""
    impulses = Image.fromarray(np.eye(n, dtype=np.float32), mode="F")
    up = np.asarray(impulses.resize((k * n, n), Image.Resampling.BILINEAR), np.float64).T
    return up, np.linalg.pinv(up)


def unscale(levels: np.ndarray, factors: tuple[int, int]) -> np.ndarray | None:
    """The image whose bilinear upscale by (ky, kx) the upload `levels` (H, W) or (H, W, C) is, to within 8-bit
    rounding (least squares); None when the upload is not one (then box decides)."""
    (ky, kx), (height, width) = factors, levels.shape[:2]
    uy, py = _bilinear(height // ky, ky)
    ux, px = _bilinear(width // kx, kx)
    x = levels.astype(np.float64)
    planes = x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)  # (C, H, W): two matrix products per plane (BLAS)
    small = py @ planes @ px.T
    if np.abs(uy @ small @ ux.T - planes).max() > UNSCALE_TOLERANCE:
        return None
    return small[0] if x.ndim == 2 else np.moveaxis(small, 0, -1)


def to_model_input(pixels: np.ndarray, contract: Preprocessing = Preprocessing()) -> np.ndarray:
    """uint8 pixels, one image or a batch ((H, W) / (N, H, W) grayscale, (H, W, 3) / (N, H, W, 3) RGB) ->
    float32 (N, C, H, W) in [0, 1]."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    shape = contract.pixel_shape
    batch = pixels[None] if pixels.shape == shape else pixels
    if batch.shape[1:] != shape:
        raise ValueError(f"expected (N, {', '.join(map(str, shape))}) pixels, got {pixels.shape}")
    x = batch.astype(np.float32) * np.float32(contract.scale)
    return x[:, None] if contract.channels == 1 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def nhwc(x: np.ndarray, what: str) -> np.ndarray:
    """A dataset's uint8 images as an .npz keeps them, NHW, NHWC or NCHW (C = 1 or 3) -> NHWC (training's loader
    and `backdoor-guard scan` read .npz files with it)."""
    if x.dtype != np.uint8:
        raise ValueError(f"{what}: images must be uint8 (0..255), got {x.dtype}")
    if x.ndim == 3:
        return x[..., None]
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x.transpose(0, 2, 3, 1)
    raise ValueError(f"{what}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3, got {x.shape}")


def to_pixels(images: np.ndarray, contract: Preprocessing = Preprocessing()) -> np.ndarray:
    """The inverse of to_model_input: float32 (N, C, H, W) in [0, 1] -> uint8 (N, H, W) or (N, H, W, 3), rounded."""
    levels = np.clip(np.rint(np.asarray(images, np.float32) / np.float32(contract.scale)), 0, 255).astype(np.uint8)
    return levels[:, 0] if contract.channels == 1 else np.ascontiguousarray(levels.transpose(0, 2, 3, 1))


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


def _premultiplied(image: Image.Image, color: str) -> Image.Image:
    """ "RGBa" or "La" -> `color` ("L" or "RGB"): the premultiplied colour (the composite onto black), alpha
    dropped."""
    bands = image.split()
    if image.mode == "La":
        return bands[0] if color == "L" else bands[0].convert(color)
    return Image.merge("RGB", bands[:3]).convert(color)


# Modes whose samples `unscale` works on: 8-bit (any number of bands, premultiplied ones included) and 16-bit gray.
UNSCALE_MODES = {"L": 255, "LA": 255, "La": 255, "RGB": 255, "RGBA": 255, "RGBa": 255, "I;16": 65535}


def _unscaled(im: Image.Image, size: tuple[int, int]) -> Image.Image | None:
    """`im` unscaled to `size` (width, height) when it is an exact nearest-neighbour or bilinear integer upscale;
    None otherwise. A nearest-neighbour upscale is left to box, which undoes it exactly."""
    ky, kx = im.height // size[1], im.width // size[0]
    if im.mode not in UNSCALE_MODES or ky not in UNSCALE_FACTORS or kx not in UNSCALE_FACTORS:
        return None
    if len(im.getbands()) * im.width * im.height * (size[0] + size[1]) > UNSCALE_MAX_WORK:
        return None
    levels = np.asarray(im)
    blocks = levels.reshape(size[1], ky, size[0], kx, *levels.shape[2:])
    if (blocks == blocks[:, :1, :, :1]).all():
        return None  # nearest-neighbour: box gives the image back exactly
    top = UNSCALE_MODES[im.mode]
    scale = top / 255  # the tolerance is in 8-bit levels
    small = unscale(levels / scale, (ky, kx))
    if small is None:
        return None
    out = np.clip(np.rint(small * scale), 0, top).astype(levels.dtype)
    return Image.frombytes(im.mode, size, out.tobytes())


def image_to_pixels(
    image: Image.Image,
    contract: Preprocessing = Preprocessing(),
    *,
    box: tuple[float, float, float, float] | None = None,
    transpose: Image.Transpose | None = None,
) -> np.ndarray:
    """Any Pillow image (any mode, any size) -> uint8 pixels in the contract's colour at its size: (H, W) for "L",
    (H, W, 3) for "RGB".

    Each mode is reduced to the small size as early as its numbers allow, so a 40-megapixel upload costs at most
    one full-size copy besides its own pixels:

    - "L", "RGB", "1", "CMYK", "P" without transparency and every other mode: Pillow's convert to the contract's
      colour, then resize.
    - "RGBA", "LA", "PA", and "P"/"1"/"L"/"RGB" with a transparency key: alpha composited onto black (the datasets'
      background) by premultiplying at full size, then resize, then the contract's colour from the premultiplied
      colour.
    - "RGBa", "La": premultiplied colour is already the composite on black: alpha is dropped.
    - "I;16*": 16-bit samples, resized at 16 bits, then scaled by 1/257 (65535 -> 255), rounded (gray, repeated
      in R, G and B for an "RGB" contract).
    - "I", "F": Pillow's convention, 0..255 levels rounded and clipped (a 16-bit PNG that older Pillow versions
      open as "I" is the caller's to convert: service.decode does).

    box: the region of `image` that holds the picture (Pillow's resize box; a JPEG decoded at a reduced scale
    covers a fractional size). transpose (from EXIF orientation) is applied last, to the small image: resizing to
    the swapped size and then transposing equals transposing and then resizing, without a full-size copy.
    """
    size = resize_target(contract, transpose)
    unscaling = contract.resample == UNSCALE
    resample = Image.Resampling.BOX if unscaling else Image.Resampling[contract.resample.upper()]

    def small(im: Image.Image) -> Image.Image:
        if im.size == size and box is None:
            return im
        integer = box is None and im.width % size[0] == 0 and im.height % size[1] == 0
        if unscaling and integer and (restored := _unscaled(im, size)) is not None:
            return restored
        chosen = Image.Resampling.BILINEAR if resample == Image.Resampling.BOX and not integer else resample
        return im.resize(size, resample=chosen, box=box)

    mode = image.mode
    if mode in SIXTEEN_BIT:
        levels = np.asarray(small(image)).astype(np.float32) / np.float32(257)
        result = Image.fromarray(np.rint(levels).astype(np.uint8), mode="L").convert(contract.color)
    elif mode in PREMULTIPLIED:
        result = small(_premultiplied(image, contract.color))  # only in memory, never straight from a file
    elif mode in ALPHA or (mode in ("P", "1", "L", "RGB") and "transparency" in image.info):
        if mode not in ("RGBA", "LA"):
            image = image.convert("RGBA")  # applies the palette's or the key colour's transparency
        # Premultiplied colour is the composite onto black: premultiply at full size, shrink, then drop alpha
        # and take the contract's colour on the small image. Peak: the decoded pixels plus one premultiplied
        # copy (8 bytes a pixel for RGBA). convert and resize release the GIL; getchannel, split and paste on the
        # full-size image hold it for tens of milliseconds each, which the event loop (and /v2/health/live)
        # would feel. Shrinking before taking gray puts an opaque RGBA image within 1 level of its RGB twin,
        # not always on it.
        result = _premultiplied(small(image.convert("RGBa" if image.mode == "RGBA" else "La")), contract.color)
    else:
        result = small(image.convert(contract.color))
    if transpose is not None:
        result = result.transpose(transpose)
    return np.asarray(result, dtype=np.uint8)
