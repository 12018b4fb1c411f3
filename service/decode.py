"""Uploaded bytes -> model input, through the preprocessing contract; every rejection is a typed 4xx."""

from __future__ import annotations

import base64
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import BadImage, TooLarge
from service.preprocess import Preprocessing, image_to_pixels

FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


def decode(data: bytes, index: int, name: str | None, contract: Preprocessing, max_pixels: int) -> np.ndarray:
    """One file's bytes -> uint8 (H, W) grayscale pixels at the contract's size."""
    label = f"file {index} ({name!r})" if name else f"file {index}"
    if not data:
        raise BadImage(f"{label} is empty", index)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise TooLarge(f"{label} is {image.width}x{image.height} = {pixels} pixels (limit {max_pixels})", index)
            image.load()
    except UnidentifiedImageError as err:
        raise BadImage(f"{label} is not a PNG, JPEG, WebP or BMP image", index) from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise TooLarge(f"{label} is too large to decode safely: {err}", index) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"{label} is corrupt or truncated: {err}", index) from err
    return image_to_pixels(image, contract)


def png_base64(image: np.ndarray) -> str:
    """float32 (1, H, W) in [0, 1] -> base64 PNG (8-bit grayscale)."""
    pixels = np.clip(np.rint(image[0] * 255), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
