"""Uploads as people send them: every case is compared with the 8-bit upright image through the same contract."""

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageOps

from service.decode import MAX_JPEG_SCANS, Header, decode, decode_pixels, open_image
from service.errors import BadImage, GuardError, TooLarge
from service.preprocess import Preprocessing, image_to_pixels

CONTRACT = Preprocessing()
WIDE = Preprocessing(height=20, width=28)  # not square: a rotation that forgot to swap the target shows
LIMIT = 40_000_000


def garment(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (H, W): a Fashion-MNIST-like item, a textured blob on a black background."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width] / np.array([height, width])[:, None, None]
    blob = ((x - 0.5) / 0.35) ** 2 + ((y - 0.45) / 0.4) ** 2 < 1
    shade = 90 + 120 * x + 30 * np.sin(25 * y) + rng.normal(0, 12, (height, width))
    return np.where(blob, np.clip(shade, 0, 255), 0).astype(np.uint8)


def colour(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (H, W, 3): a garment tinted differently per channel."""
    gray = garment(height, width, seed).astype(np.float32)
    return np.clip(gray[..., None] * np.array([1.0, 0.7, 0.4]) + np.array([0, 20, 60]), 0, 255).astype(np.uint8)


def alpha(height: int, width: int) -> np.ndarray:
    """uint8 (H, W): opaque, transparent and half-transparent regions."""
    a = np.full((height, width), 255, np.uint8)
    a[:, : width // 3] = 0
    a[height // 2 :, width // 3 : 2 * width // 3] = 128
    return a


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def reference(gray: np.ndarray, contract: Preprocessing = CONTRACT) -> np.ndarray:
    """The 8-bit upright grayscale image through the contract."""
    return image_to_pixels(Image.fromarray(gray, mode="L"), contract)


def composite(rgb: np.ndarray, a: np.ndarray) -> np.ndarray:
    """uint8 (H, W): luminance (ITU-R 601, Pillow's weights) composited onto black, in float, rounded once."""
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.rint(luma * a / 255).astype(np.uint8)


def assert_close(actual: np.ndarray, expected: np.ndarray, levels: int = 1) -> None:
    assert actual.shape == expected.shape and actual.dtype == np.uint8
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= levels


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(samples: np.ndarray, color_type: int, bit_depth: int = 16) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB or gray+alpha): samples (H, W[, C]) big-endian."""
    height, width = samples.shape[:2]
    rows = samples.astype(">u2" if bit_depth == 16 else np.uint8).reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with another declared size (and a valid IHDR checksum, so only the size is a lie)."""
    ihdr = struct.pack(">II", width, height) + png[24:29]
    return png[:8] + chunk(b"IHDR", ihdr) + png[33:]


# --- 16-bit -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(28, 28), (60, 44)])
@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_grayscale_png_is_scaled_like_its_8bit_twin(size: tuple[int, int], mode: str) -> None:
    gray = garment(*size)
    wide = (gray.astype(np.uint16) * 257).astype(">u2" if mode == "I;16B" else "<u2")  # 255 -> 65535
    image = Image.frombytes(mode, (size[1], size[0]), wide.tobytes())
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    levels = 0 if size == (28, 28) else 1  # 16-bit resizing rounds once, 8-bit resizing twice
    assert_close(decode(data, 0, "deep.png", CONTRACT, LIMIT), reference(gray), levels)


@pytest.mark.parametrize(("color_type", "channels"), [(2, 3), (4, 2), (6, 4)], ids=["RGB", "gray+alpha", "RGBA"])
def test_16bit_colour_and_alpha_pngs_match_their_8bit_twins(color_type: int, channels: int) -> None:
    rgb, a = colour(60, 44), alpha(60, 44)
    gray = garment(60, 44)
    eight = {2: rgb, 4: np.dstack([gray, a]), 6: np.dstack([rgb, a])}[color_type]
    assert eight.shape[2] == channels
    deep = decode(png_raw(eight.astype(np.uint16) * 257, color_type), 0, None, CONTRACT, LIMIT)
    twin = decode(png_raw(eight, color_type, bit_depth=8), 0, None, CONTRACT, LIMIT)
    np.testing.assert_array_equal(deep, twin)


def test_png_opened_as_32bit_i_is_16bit() -> None:
    """Older Pillow versions open 16-bit grayscale PNGs as "I": still 0..65535, still scaled."""
    gray = garment(28, 28)
    image = Image.fromarray(gray.astype(np.int32) * 257, mode="I")
    image.format = "PNG"  # what Image.open would have set
    pixels = decode_pixels(Header(image, 28 * 28, "file 0"), 0, CONTRACT)
    np.testing.assert_array_equal(pixels, gray)


def test_float_images_are_on_the_0_255_scale() -> None:
    gray = garment(28, 28)
    np.testing.assert_array_equal(image_to_pixels(Image.fromarray(gray.astype(np.float32), mode="F")), gray)


# --- EXIF orientation ---------------------------------------------------------------------------------------

# upright -> stored, by the EXIF specification's meaning of each tag value (independent of Pillow's table).
STORED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.T,
    6: lambda a: np.rot90(a, 1),  # the viewer turns it 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).T,
    8: lambda a: np.rot90(a, -1),
}


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(("fmt", "options"), [("PNG", {}), ("WEBP", {"lossless": True})])
@pytest.mark.parametrize(("size", "contract"), [((28, 28), CONTRACT), ((50, 36), WIDE)])
def test_exif_orientation_gives_the_upright_picture(
    orientation: int, fmt: str, options: dict[str, object], size: tuple[int, int], contract: Preprocessing
) -> None:
    upright = garment(*size)
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright)), mode="L")
    data = encode(stored, fmt, exif=exif(orientation), **options)
    levels = 0 if size == (28, 28) else 1  # resized then turned: the two resize passes swap order
    assert_close(decode(data, 0, None, contract, LIMIT), reference(upright, contract), levels)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_of_a_jpeg_follows_exif_transpose(orientation: int) -> None:
    stored = Image.fromarray(colour(44, 60))
    data = encode(stored, "JPEG", quality=95, exif=exif(orientation))
    expected = image_to_pixels(ImageOps.exif_transpose(Image.open(io.BytesIO(data))), WIDE)  # full-size turn
    assert_close(decode(data, 0, None, WIDE, LIMIT), expected)


def test_corrupt_exif_is_ignored() -> None:
    gray = garment(28, 28)
    broken = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01"  # an IFD that claims 5 entries and ends
    data = encode(Image.fromarray(gray), "PNG", exif=broken)
    np.testing.assert_array_equal(decode(data, 0, None, CONTRACT, LIMIT), gray)


# --- modes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "fmt"),
    [
        (lambda rgb, a: Image.fromarray(rgb), "PNG"),
        (lambda rgb, a: Image.fromarray(rgb).quantize(64), "PNG"),
        (lambda rgb, a: Image.fromarray(rgb).quantize(64), "GIF"),
        (lambda rgb, a: Image.fromarray(rgb).quantize(64), "BMP"),
        (lambda rgb, a: Image.fromarray(rgb).convert("CMYK"), "JPEG"),
    ],
    ids=["RGB-png", "P-png", "P-gif", "P-bmp", "CMYK"],
)
def test_opaque_modes_equal_their_rgb_twin(make: Callable[..., Image.Image], fmt: str) -> None:
    rgb = colour(60, 44)
    image = make(rgb, None)
    twin = image.convert("RGB")
    if fmt == "JPEG":  # lossy: the twin is what the file decodes to
        twin = Image.open(io.BytesIO(encode(image, fmt))).convert("RGB")
    np.testing.assert_array_equal(decode(encode(image, fmt), 0, None, CONTRACT, LIMIT), image_to_pixels(twin))


def test_bilevel_image_is_black_and_white() -> None:
    bits = garment(28, 28) > 100
    image = Image.fromarray(bits).convert("1")
    np.testing.assert_array_equal(decode(encode(image, "PNG"), 0, None, CONTRACT, LIMIT), bits.astype(np.uint8) * 255)


@pytest.mark.parametrize("kind", ["RGBA", "RGBa", "PA"])
@pytest.mark.parametrize("size", [(28, 28), (60, 44)])
def test_alpha_is_composited_onto_black(kind: str, size: tuple[int, int]) -> None:
    rgb, a = colour(*size), alpha(*size)
    image = Image.fromarray(np.dstack([rgb, a]), mode="RGBA")
    if kind == "RGBa":
        image = image.convert("RGBa")  # premultiplied: the colour already is the composite
    elif kind == "PA":
        image = Image.fromarray(rgb).quantize(256).convert("PA")
        image.putalpha(Image.fromarray(a))
        rgb = np.asarray(image.convert("RGB"))  # the palette's colours
    assert_close(image_to_pixels(image), reference(composite(rgb, a)))


@pytest.mark.parametrize("premultiplied", [False, True])
def test_gray_alpha_is_composited_onto_black(premultiplied: bool) -> None:
    gray, a = garment(60, 44), alpha(60, 44)
    image = Image.fromarray(np.dstack([gray, a]), mode="LA")
    if premultiplied:
        image = image.convert("La")
    expected = reference(np.rint(gray * (a / 255)).astype(np.uint8))
    assert_close(image_to_pixels(image), expected)
    if not premultiplied:
        assert_close(decode(encode(image, "PNG"), 0, None, CONTRACT, LIMIT), expected)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_equals_its_rgba_twin(fmt: str) -> None:
    rgb = colour(60, 44)
    palette = Image.fromarray(rgb).quantize(64)
    index = np.asarray(palette)
    key = int(index[30, 22])  # a colour inside the garment becomes see-through
    data = encode(palette, fmt, transparency=key)
    twin = np.dstack([np.asarray(palette.convert("RGB")), np.where(index == key, 0, 255).astype(np.uint8)])
    rgba_png = encode(Image.fromarray(twin, mode="RGBA"), "PNG")
    expected = decode(rgba_png, 0, None, CONTRACT, LIMIT)
    np.testing.assert_array_equal(decode(data, 0, None, CONTRACT, LIMIT), expected)
    assert_close(expected, reference(composite(twin[..., :3], twin[..., 3])))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_transparency_key_colour_is_composited_like_alpha(mode: str) -> None:
    """A PNG tRNS key (one see-through colour in an L or RGB image) is transparency too, as viewers show it."""
    image = Image.fromarray(colour(60, 44)).convert(mode)
    pixels = np.asarray(image)
    key = pixels[30, 22]
    data = encode(image, "PNG", transparency=int(key) if mode == "L" else tuple(int(v) for v in key))
    see_through = pixels == key if mode == "L" else (pixels == key).all(axis=-1)
    twin = np.dstack([np.asarray(image.convert("RGB")), np.where(see_through, 0, 255).astype(np.uint8)])
    expected = decode(encode(Image.fromarray(twin, mode="RGBA"), "PNG"), 0, None, CONTRACT, LIMIT)
    assert see_through.sum() > 0
    np.testing.assert_array_equal(decode(data, 0, None, CONTRACT, LIMIT), expected)


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_rgba_files_composite_onto_black(fmt: str) -> None:
    rgb, a = colour(60, 44), alpha(60, 44)
    data = encode(
        Image.fromarray(np.dstack([rgb, a]), mode="RGBA"), fmt, **({"lossless": True} if fmt == "WEBP" else {})
    )
    assert_close(decode(data, 0, None, CONTRACT, LIMIT), reference(composite(rgb, a)))


def test_grayscale_28x28_png_is_lossless() -> None:
    gray = np.random.default_rng(1).integers(0, 256, (28, 28)).astype(np.uint8)
    np.testing.assert_array_equal(decode(encode(Image.fromarray(gray), "PNG"), 0, None, CONTRACT, LIMIT), gray)


# --- frames and formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options"), [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})], ids=["GIF", "APNG", "WebP"]
)
def test_animations_give_their_first_frame(fmt: str, options: dict[str, object]) -> None:
    frames = [Image.fromarray(colour(40, 36, seed)) for seed in range(3)]
    if fmt == "GIF":
        frames = [frame.quantize(64) for frame in frames]
    animated = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **options)
    assert getattr(Image.open(io.BytesIO(animated)), "n_frames", 1) == 3
    still = encode(frames[0], fmt, **options)
    first, alone = decode(animated, 0, None, CONTRACT, LIMIT), decode(still, 0, None, CONTRACT, LIMIT)
    # An animated WebP decodes as RGBA (opaque) and its still twin as RGB: the alpha path shrinks before taking
    # gray (see image_to_pixels), within 1 level of the opaque path; GIF and APNG frames are the same modes.
    assert_close(first, alone, 1 if fmt == "WEBP" else 0)
    assert_close(decode(still, 0, None, CONTRACT, LIMIT), image_to_pixels(frames[0].convert("RGB")), 0)


def test_apng_with_a_broken_animation_control_gives_its_default_image() -> None:
    """Pillow warns "Invalid APNG, will use default PNG image" and does so; that is the rule here too."""
    still = encode(Image.fromarray(colour(40, 36)), "PNG")
    broken = still[:33] + chunk(b"acTL", struct.pack(">II", 0, 0)) + still[33:]  # zero frames
    np.testing.assert_array_equal(decode(broken, 0, None, CONTRACT, LIMIT), decode(still, 0, None, CONTRACT, LIMIT))


@pytest.mark.parametrize("frames", [1, 3])
def test_tiff_is_refused_naming_the_accepted_formats(frames: int) -> None:
    pages = [Image.fromarray(garment(28, 28, seed)) for seed in range(frames)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    with pytest.raises(BadImage) as caught:
        open_image(data, 2, "scan.tif", LIMIT)
    assert caught.value.status == 400 and caught.value.file_index == 2
    assert "file 2 ('scan.tif')" in caught.value.message
    assert all(name in caught.value.message for name in ("PNG", "JPEG", "WebP", "BMP", "GIF"))


# --- the two steps and their errors ---------------------------------------------------------------------------


def test_open_image_reads_only_the_header() -> None:
    """A PNG that declares 6000 x 6000 (within the limit) but holds 28 x 28 worth of data: the header step passes
    (it never decodes), the pixel step finds the data short."""
    small = encode(Image.fromarray(garment(28, 28)), "PNG")
    header = open_image(with_ihdr_size(small, 6000, 6000), 4, "big.png", LIMIT)
    assert header.pixels == 36_000_000 and header.label == "file 4 ('big.png')"
    with pytest.raises(BadImage) as caught:
        decode_pixels(header, 4, CONTRACT)
    assert caught.value.status == 400 and caught.value.file_index == 4 and "truncated" in caught.value.message


def test_decode_pixels_frees_the_full_size_image() -> None:
    header = open_image(encode(Image.fromarray(garment(60, 44)), "PNG"), 0, None, LIMIT)
    decode_pixels(header, 0, CONTRACT)
    with pytest.raises(ValueError, match="closed"):
        header.image.load()


def test_large_jpeg_is_decoded_at_reduced_scale() -> None:
    """libjpeg's DCT scaling: the 2400 x 1800 photo is never held at full size, and the answer barely moves."""
    photo = Image.fromarray(colour(45, 60)).resize((2400, 1800), Image.Resampling.BICUBIC)
    data = encode(photo, "JPEG", quality=90)
    header = open_image(data, 0, None, LIMIT)
    pixels = decode_pixels(header, 0, CONTRACT)
    assert header.image.size == (600, 450)  # 1/4 scale: still 16 x the contract's 28
    full = Image.open(io.BytesIO(data))
    full.load()
    assert_close(pixels, image_to_pixels(full), levels=2)


def bad_inputs() -> dict[str, tuple[bytes, type[GuardError]]]:
    png = encode(Image.fromarray(garment(40, 40)), "PNG")
    jpeg = encode(Image.fromarray(colour(40, 40)), "JPEG")
    gif = encode(Image.fromarray(colour(40, 40)).quantize(64), "GIF")
    webp = encode(Image.fromarray(colour(40, 40)), "WEBP")
    bmp = encode(Image.fromarray(colour(40, 40)), "BMP")
    bmp_bomb = bytearray(bmp)
    struct.pack_into("<ii", bmp_bomb, 18, 100_000, 100_000)  # BITMAPINFOHEADER width, height: 10 Gpixel
    return {
        "empty": (b"", BadImage),
        "text": (b"hello, this is not an image", BadImage),
        "png-truncated": (png[: len(png) // 2], BadImage),
        "jpeg-truncated": (jpeg[: len(jpeg) // 2], BadImage),
        "gif-truncated": (gif[: len(gif) // 2], BadImage),
        "webp-truncated": (webp[: len(webp) // 2], BadImage),
        "bmp-truncated": (bmp[: len(bmp) // 2], BadImage),
        "png-bad-header-crc": (png[:20] + b"\xff" + png[21:], BadImage),
        # an empty iCCP chunk after the pixels: Pillow's chunk handler raises IndexError while loading
        "png-empty-iccp": (png[:-12] + chunk(b"iCCP", b"") + png[-12:], BadImage),
        "png-over-limit": (with_ihdr_size(png, 7000, 7000), TooLarge),
        "png-bomb": (with_ihdr_size(png, 60000, 60000), TooLarge),
        "bmp-bomb": (bytes(bmp_bomb), TooLarge),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_inputs_are_typed_errors_with_the_file_index(case: str) -> None:
    data, error = bad_inputs()[case]
    with pytest.raises(error) as caught:
        decode(data, 3, "upload.bin", CONTRACT, LIMIT)
    assert caught.value.status == (413 if error is TooLarge else 400)
    assert caught.value.file_index == 3 and "file 3 ('upload.bin')" in caught.value.message


def progressive_jpeg(extra_scans: int) -> bytes:
    """A 64 x 64 progressive JPEG, with its smallest scan repeated `extra_scans` more times (libjpeg decodes it:
    each extra scan is one more pass over every block, the cost of a scan bomb)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    scans = [data[a:b] for a, b in zip(starts, [*starts[1:], len(data) - 2], strict=True)]
    return data[: starts[0]] + b"".join(scans) + min(scans, key=len) * extra_scans + b"\xff\xd9"


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding() -> None:
    ordinary = progressive_jpeg(0)
    assert 1 < ordinary.count(b"\xff\xda") < MAX_JPEG_SCANS  # what encoders write
    assert decode(ordinary, 0, "p.jpg", Preprocessing(), 1 << 20).shape == (28, 28)
    with pytest.raises(TooLarge, match=f"JPEG scans \\(limit {MAX_JPEG_SCANS}\\)"):
        open_image(progressive_jpeg(MAX_JPEG_SCANS), 0, "bomb.jpg", 1 << 20)


def test_an_mpo_of_too_many_scans_is_refused_like_a_jpeg() -> None:
    """Pillow opens a JPEG with a multi-picture header as format "MPO": the scan limit holds for it too."""
    first, second = (Image.fromarray(np.full((64, 64), v, np.uint8)) for v in (40, 200))
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[second], progressive=True, quality=90)
    mpo = buffer.getvalue()
    assert open_image(mpo, 0, "pair.mpo", 1 << 20).image.format == "MPO"  # an ordinary one opens
    end = mpo.index(b"\xff\xd9")  # the first picture's end
    starts = [i for i in range(end) if mpo[i : i + 2] == b"\xff\xda"]
    smallest = min((mpo[a:b] for a, b in zip(starts, [*starts[1:], end], strict=True)), key=len)
    bomb = mpo[:end] + smallest * MAX_JPEG_SCANS + mpo[end:]
    with pytest.raises(TooLarge, match=f"JPEG scans \\(limit {MAX_JPEG_SCANS}\\)"):
        open_image(bomb, 0, "bomb.mpo", 1 << 20)


def test_a_png_of_too_much_compressed_text_is_refused_before_its_text_is_inflated() -> None:
    """zTXt chunks inflate at Image.open, before the pixels: a few KB that inflate to megabytes are a 400."""
    from service.decode import MAX_PNG_TEXT_BYTES

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buffer, "PNG")
    plain = buffer.getvalue()

    def with_text(size: int, chunks: int) -> bytes:
        text = zlib.compress(b"a" * size, 9)
        ztxt = b"".join(chunk(b"zTXt", b"k%d\x00\x00" % i + text) for i in range(chunks))
        return plain[:33] + ztxt + plain[33:]  # after IHDR, before IDAT

    assert decode(with_text(4096, 4), 0, "caption.png", CONTRACT, LIMIT).shape == (28, 28)  # metadata-sized
    for size, chunks in ((MAX_PNG_TEXT_BYTES + 1, 1), (MAX_PNG_TEXT_BYTES // 4, 8)):  # one chunk, or their sum
        with pytest.raises(BadImage, match=r"text chunks|Decompressed"):
            open_image(with_text(size, chunks), 0, "bomb.png", LIMIT)
