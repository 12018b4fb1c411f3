"""The hostile-input corpus, made on the fly: every case gets its documented status and error shape, never a
5xx, and the service is live and ready after each one."""

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.conftest import MODELS
from tests.service.asgi import BOUNDARY, CONTENT_TYPE, multipart, part_head
from tests.service.conftest import wait_ready

pytestmark = pytest.mark.data
GRAY = np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1))


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray = GRAY) -> bytes:
    return encode(Image.fromarray(pixels), "PNG")


def png_with_size(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with one tiny (wrong-sized) IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")
    )


def zlib_bomb_png() -> bytes:
    """7,999 x 5,000 (just under the 40 Mpx limit): 40 MB of pixels in ~40 KB of file."""
    raw = b"\x00" * (8000 * 5000)  # each row: its filter byte, then 7,999 pixels

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 7999, 5000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def body(*blobs: bytes) -> bytes:
    return multipart(*blobs)


Case = tuple[str, Callable[[], dict], int, str | None]  # id, request kwargs, status, error code


def raw(content: bytes, content_type: str = CONTENT_TYPE, **headers: str) -> dict:
    return {"content": content, "headers": {"content-type": content_type, **headers}}


def upload(*blobs: bytes) -> dict:
    return raw(body(*blobs))


CASES: list[Case] = [
    # not images, or broken ones: 400 bad_image with the file's index
    ("empty file", lambda: upload(b""), 400, "bad_image"),
    ("text", lambda: upload(b"hello, world"), 400, "bad_image"),
    ("html", lambda: upload(b"<html><script>alert(1)</script></html>"), 400, "bad_image"),
    ("svg", lambda: upload(b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"/>'), 400, "bad_image"),
    ("pdf", lambda: upload(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"), 400, "bad_image"),
    ("zip", lambda: upload(b"PK\x03\x04" + b"\x00" * 26), 400, "bad_image"),
    ("tiff", lambda: upload(encode(Image.fromarray(GRAY), "TIFF")), 400, "bad_image"),
    ("truncated png", lambda: upload(png_bytes()[:-30]), 400, "bad_image"),
    ("png signature only", lambda: upload(b"\x89PNG\r\n\x1a\n"), 400, "bad_image"),
    ("png bad crc", lambda: upload(png_bytes()[:29] + b"\x00\x00\x00\x00" + png_bytes()[33:]), 400, "bad_image"),
    ("png zero width", lambda: upload(png_with_size(0, 28)), 400, "bad_image"),
    ("png idat too short", lambda: upload(png_with_size(28, 28)), 400, "bad_image"),
    ("truncated jpeg", lambda: upload(encode(Image.fromarray(GRAY), "JPEG")[:200]), 400, "bad_image"),
    ("jpeg header only", lambda: upload(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"), 400, "bad_image"),
    ("bmp header only", lambda: upload(b"BM" + b"\x00" * 12), 400, "bad_image"),
    ("webp header only", lambda: upload(b"RIFF\x10\x00\x00\x00WEBPVP8 "), 400, "bad_image"),
    ("gif header only", lambda: upload(b"GIF89a\x1c\x00\x1c\x00"), 400, "bad_image"),
    ("good then bad", lambda: upload(png_bytes(), b"junk"), 400, "bad_image"),
    # too large to decode: 413 before decoding
    ("declares 60000 x 60000", lambda: upload(png_with_size(60000, 60000)), 413, "too_large"),
    ("declares 40000 x 1001", lambda: upload(png_with_size(40000, 1001)), 413, "too_large"),
    ("file over the byte limit", lambda: upload(b"\x89PNG" + b"\x00" * (4 << 20)), 413, "too_large"),
    ("65 files", lambda: upload(*[png_bytes()] * 65), 413, "too_many_files"),
    ("100 files", lambda: upload(*[png_bytes()] * 100), 413, "too_many_files"),
    # the request itself is wrong
    ("json body", lambda: raw(b'{"files": []}', "application/json"), 415, "unsupported_media_type"),
    ("no content type", lambda: {"content": body(png_bytes())}, 415, "unsupported_media_type"),
    ("urlencoded", lambda: raw(b"files=abc", "application/x-www-form-urlencoded"), 415, "unsupported_media_type"),
    ("multipart without boundary", lambda: raw(body(png_bytes()), "multipart/form-data"), 400, "bad_request"),
    ("wrong boundary", lambda: raw(body(png_bytes()), "multipart/form-data; boundary=other"), 400, "bad_request"),
    ("300-character boundary", lambda: raw(b"x", "multipart/form-data; boundary=" + "a" * 300), 400, "bad_request"),
    ("no closing boundary", lambda: raw(body(png_bytes())[:-20]), 400, "bad_request"),
    ("empty body", lambda: raw(b""), 400, "bad_request"),
    ("garbage body", lambda: raw(b"\x00\xff" * 500), 400, "bad_request"),
    (
        "no files part",
        lambda: raw(part_head(name="other", filename=None) + b"x\r\n" + f"--{BOUNDARY}--\r\n".encode()),
        422,
        "no_files",
    ),
    (
        "files without filename",
        lambda: raw(part_head(filename=None) + png_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()),
        422,
        "no_files",
    ),
    ("only the closing boundary", lambda: raw(f"--{BOUNDARY}--\r\n".encode()), 422, "no_files"),
    (
        "huge part header",
        lambda: raw(f"--{BOUNDARY}\r\nX-Junk: {'a' * 20000}\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode()),
        400,
        "bad_request",
    ),
    ("content-length not a number", lambda: raw(body(png_bytes()), **{"content-length": "lots"}), 400, None),
    # odd but valid: classified
    ("1x1 image", lambda: upload(png_bytes(np.zeros((1, 1), np.uint8))), 200, None),
    ("1 x 5000 image", lambda: upload(png_bytes(np.zeros((1, 5000), np.uint8))), 200, None),
    ("16-bit png", lambda: upload(encode(Image.fromarray(GRAY.astype(np.uint16) * 257), "PNG")), 200, None),
    ("palette png", lambda: upload(encode(Image.fromarray(GRAY).convert("P"), "PNG")), 200, None),
    ("cmyk jpeg", lambda: upload(encode(Image.fromarray(GRAY).convert("CMYK"), "JPEG")), 200, None),
    ("gif", lambda: upload(encode(Image.fromarray(GRAY), "GIF")), 200, None),
    ("bmp", lambda: upload(encode(Image.fromarray(GRAY), "BMP")), 200, None),
    ("webp", lambda: upload(encode(Image.fromarray(GRAY), "WEBP", lossless=True)), 200, None),
    (
        "unicode and quotes in the filename",
        lambda: raw(
            part_head(filename='ünï "c".png'.replace('"', "%22")) + png_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()
        ),
        200,
        None,
    ),
    (
        "extra fields beside the files",
        lambda: raw(part_head(name="note", filename=None) + b"hi\r\n" + body(png_bytes())),
        200,
        None,
    ),
    ("zlib bomb within the pixel limit", lambda: upload(zlib_bomb_png()), 200, None),
]


@pytest.fixture(scope="module")
def guard() -> TestClient:
    with TestClient(create_app(Settings(models_dir=MODELS))) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize(("request_kwargs", "status", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_its_status_and_error_shape(guard: TestClient, request_kwargs, status: int, code) -> None:
    response = guard.post("/classify", **request_kwargs())
    assert response.status_code == status, response.text
    if status != 200:
        error = response.json()["error"]
        assert set(error) == {"code", "message", "file_index"} and error["message"]
        if code is not None:
            assert error["code"] == code
    else:
        assert all(r["label"] in range(10) for r in response.json()["results"])
    assert guard.get("/v2/health/live").status_code == 200
    assert guard.get("/v2/health/ready").status_code == 200
