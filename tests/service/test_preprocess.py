import numpy as np
import pytest
from PIL import Image

from service.preprocess import Preprocessing, image_to_pixels, to_model_input


def test_uint8_to_model_input() -> None:
    pixels = np.array([[0, 255], [51, 102]], np.uint8)
    out = to_model_input(pixels, Preprocessing(height=2, width=2))
    assert out.shape == (1, 1, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], np.array([[0, 1], [0.2, 0.4]]), atol=1e-7)


def test_rejects_wrong_dtype_and_shape() -> None:
    with pytest.raises(TypeError):
        to_model_input(np.zeros((28, 28), np.float32))
    with pytest.raises(ValueError):
        to_model_input(np.zeros((3, 27, 28), np.uint8))


def test_grayscale_28x28_is_lossless() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28)).astype(np.uint8)
    np.testing.assert_array_equal(image_to_pixels(Image.fromarray(pixels)), pixels)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "I;16", "1", "CMYK"])
def test_any_mode_and_size_becomes_28x28_gray(mode: str) -> None:
    image = Image.new("RGB", (100, 60), (200, 100, 50)).convert(mode)
    out = image_to_pixels(image)
    assert out.shape == (28, 28) and out.dtype == np.uint8


def test_transparent_pixels_become_black_background() -> None:
    image = Image.new("RGBA", (28, 28), (255, 255, 255, 0))
    image.putpixel((3, 4), (255, 255, 255, 255))
    out = image_to_pixels(image)
    assert out[4, 3] == 255 and out.sum() == 255


@pytest.mark.parametrize("transpose", list(Image.Transpose))
def test_transpose_after_resizing_equals_transpose_before(transpose: Image.Transpose) -> None:
    """The service turns EXIF-rotated uploads after shrinking them; the reference turns the full-size image."""
    contract = Preprocessing(height=20, width=28)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 70)).astype(np.uint8))
    turned_first = image_to_pixels(image.transpose(transpose), contract)
    turned_last = image_to_pixels(image, contract, transpose=transpose)
    assert turned_last.shape == (20, 28)
    assert np.abs(turned_last.astype(int) - turned_first.astype(int)).max() <= 1


def test_16bit_is_scaled_not_clipped() -> None:
    levels = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    image = Image.fromarray(levels * 257)  # I;16: 0..65535
    assert image.mode == "I;16"
    np.testing.assert_array_equal(image_to_pixels(image, Preprocessing(height=16, width=16)), levels)
