"""Uploaded bytes -> model input, through the preprocessing contract; every rejection is a typed 4xx.

Two steps, so that admission knows an upload's cost before paying it: `open_image` reads only the header
(format, size) and checks it; `decode_pixels` decodes and applies the contract, in a worker thread if need be.

Images as people send them:
- Formats: PNG (and APNG), JPEG, WebP, BMP, GIF. Anything else (TIFF included) is a 400 that names these.
- Animated or multi-frame files (APNG, animated GIF and WebP, MPO): the first frame, the picture a still-image
  viewer shows (for APNG, its default image).
- EXIF orientation (tag 0x0112, as `ImageOps.exif_transpose` reads it) is honoured: the result is the upright
  picture. An unreadable EXIF block is ignored, as browsers do.
- Transparency (alpha, a palette's or a tRNS key colour's) is composited onto black: see `image_to_pixels`.
- 16-bit grayscale PNGs are scaled to 8 bits (65535 -> 255), not clipped. Pillow opens them as "I;16" (older
  versions as "I": a PNG opened as "I" is 16-bit, since PNG has no wider samples). 16-bit RGB and gray+alpha
  PNGs Pillow already reduces to 8 bits (the high byte). A 16-bit grayscale tRNS key is ignored (as before).
- JPEGs much larger than the contract are decoded by libjpeg at 1/2 to 1/8 scale (DCT scaling), so a
  40-megapixel photo never exists at full size; this stays within 2 grey levels of a full-size decode.
"""

from __future__ import annotations

import base64
import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from service.errors import BadImage, TooLarge
from service.preprocess import Preprocessing, image_to_pixels

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
ACCEPTED = "a PNG, JPEG, WebP, BMP or GIF image"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")  # file names of FORMATS (folders of images)

# What Pillow raises on hostile or broken bytes: open() turns some into UnidentifiedImageError (an OSError), but
# decoders and chunk handlers running in load() let others through (IndexError from a short iCCP chunk, struct.error
# from short fields, ZeroDivisionError / KeyError / TypeError from nonsensical header values).
PILLOW_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    ZeroDivisionError,
    IndexError,
    KeyError,
    TypeError,
)
# The same, plus Pillow's UserWarnings about the data, which are exceptions where warnings are errors (pytest,
# `python -W error`): the threads that decode cannot scope warning filters safely (they are process-wide).
PILLOW_ERRORS_OR_WARNINGS: tuple[type[Exception], ...] = (*PILLOW_ERRORS, UserWarning)

# EXIF orientation -> the transpose that makes the picture upright (the table ImageOps.exif_transpose uses).
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# The orientations that turn the picture a quarter (its height and width swap)
QUARTER_TURNS = (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                 Image.Transpose.ROTATE_270)  # fmt: skip

# A JPEG is decoded at a reduced scale only while it stays at least this many times the contract's longer side:
# the 8x8 DCT averaging is then small next to the resize filter (measured: within 2 levels, 1 almost everywhere).
DRAFT_OVERSAMPLING = 16


# Scans a JPEG may hold. Each scan of a progressive JPEG is another pass over every block of the image, so a small
# file of thousands of scans costs seconds of CPU for a picture of a few thousand pixels (a "scan bomb"); encoders
# write a few dozen at most (libjpeg's progressive script: 10 for colour, 6 for grey; its own djpeg -maxscans guards
# against the same).
MAX_JPEG_SCANS = 100

# Decompressed text a PNG may hold (zTXt, iTXt and tEXt chunks; Pillow's own limit is 64 MiB per image). Image.open
# inflates the text chunks before the pixels, on the event loop and before the request holds its queue places, so a
# file of a few tens of KB of compressed text would otherwise cost up to Pillow's 64 MiB, and a request of many
# such files gigabytes. Metadata that cameras and editors write (XMP, a caption) is kilobytes. Above it: a 400.
MAX_PNG_TEXT_BYTES = 1 << 20
PngImagePlugin.MAX_TEXT_MEMORY = MAX_PNG_TEXT_BYTES
PngImagePlugin.MAX_TEXT_CHUNK = min(PngImagePlugin.MAX_TEXT_CHUNK, MAX_PNG_TEXT_BYTES)


@dataclass(frozen=True)
class Header:
    """An upload whose header has been read and checked; the pixels are not decoded yet."""

    image: Image.Image  # opened lazily by Pillow (Image.open), not loaded
    pixels: int  # width x height of the frame that will be decoded
    label: str  # "file 3 ('a.png')", for error messages


def open_image(data: bytes, index: int, name: str | None, max_pixels: int) -> Header:
    """Cheap: parse the header only (no pixel decoding); raises BadImage (empty, not an accepted format, corrupt
    header) or TooLarge (over max_pixels, decompression bomb).

    Call it from one thread (the event loop): it scopes warning filters, which are process-wide.
    """
    label = f"file {index} ({name!r})" if name else f"file {index}"
    if not data:
        raise BadImage(f"{label} is empty", index)
    try:
        with warnings.catch_warnings():
            # Pillow's UserWarnings on open are about the data ("Invalid APNG, will use default PNG image"): what
            # it then does is the documented behaviour here, so they are not a server-side problem to log.
            warnings.simplefilter("ignore", UserWarning)
            # Pillow warns, then refuses, above its own pixel limit: both are a refusal here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError as err:
        raise BadImage(f"{label} is not {ACCEPTED}", index) from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise TooLarge(f"{label} is too large to decode safely: {err}", index) from err
    except PILLOW_ERRORS as err:
        raise BadImage(f"{label} has a corrupt header: {err}", index) from err
    pixels = image.width * image.height
    if pixels > max_pixels:
        image.close()
        raise TooLarge(f"{label} is {image.width}x{image.height} = {pixels} pixels (limit {max_pixels})", index)
    # An SOS marker cannot occur inside entropy-coded data (an 0xFF there is followed by 0x00 or a restart marker), so
    # this counts the scans, plus any in an embedded thumbnail or (MPO: a JPEG that holds several pictures, which
    # Pillow opens as format "MPO") in the other pictures
    if image.format in ("JPEG", "MPO") and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        image.close()
        raise TooLarge(f"{label} holds {scans} JPEG scans (limit {MAX_JPEG_SCANS}): too costly to decode safely", index)
    return Header(image, pixels, label)


def decode_pixels(header: Header, index: int, contract: Preprocessing) -> np.ndarray:
    """Heavy: decode the first frame and apply the contract -> uint8 (H, W); raises BadImage on corrupt/truncated
    data. Safe to call from a worker thread.

    It consumes the header: the image is closed afterwards, so its full-size pixels are freed now rather than
    when the request that holds the header ends (the pixel budget assumes they are).
    """
    image = header.image
    try:
        side = DRAFT_OVERSAMPLING * max(contract.width, contract.height)
        draft = image.draft(None, (side, side))  # JPEG only (None for the others): libjpeg's DCT scaling
        image.load()  # the first frame: Image.open positions every format there
        transpose = upright(image)
        if image.mode == "I" and image.format == "PNG":
            image = image.convert("I;16")  # older Pillow versions: 16-bit grayscale, values 0..65535
        return image_to_pixels(image, contract, box=draft[1] if draft else None, transpose=transpose)
    except PILLOW_ERRORS_OR_WARNINGS as err:  # refused rather than crashing the request
        raise BadImage(f"{header.label} is corrupt or truncated: {err}", index) from err
    finally:
        header.image.close()


def decode(data: bytes, index: int, name: str | None, contract: Preprocessing, max_pixels: int) -> np.ndarray:
    """Both steps (kept for existing callers)."""
    return decode_pixels(open_image(data, index, name, max_pixels), index, contract)


def upright(image: Image.Image) -> Image.Transpose | None:
    """The transpose that EXIF orientation asks for; None when there is none or the EXIF block is unreadable."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation)
    except PILLOW_ERRORS_OR_WARNINGS:  # e.g. "Corrupt EXIF data": the orientation is then unknown
        return None
    return ORIENTATIONS.get(orientation) if isinstance(orientation, int) else None


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of the picture as decoded: EXIF orientations 5 to 8 turn it a quarter, swapping them."""
    turned = upright(image) in QUARTER_TURNS
    return (image.width, image.height) if turned else (image.height, image.width)


def png_base64(image: np.ndarray) -> str:
    """float32 (C, H, W) in [0, 1] -> base64 PNG (8-bit grayscale for one channel, RGB for three)."""
    pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    if len(pixels) == 1:
        Image.fromarray(pixels[0], mode="L").save(buffer, format="PNG")
    else:
        Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), mode="RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
