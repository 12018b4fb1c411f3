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


# ---- "unscale": an integer upscale sent to the service comes back --------------------------------------------
def garments(n: int = 40) -> np.ndarray:
    """Smooth images with hard edges against black, like Fashion-MNIST's (no dataset needed)."""
    rng = np.random.default_rng(3)
    ys, xs = np.mgrid[0:28, 0:28]
    out = []
    for _ in range(n):
        cy, cx, ry, rx = rng.uniform(9, 19), rng.uniform(9, 19), rng.uniform(5, 12), rng.uniform(4, 11)
        inside = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 < 1
        texture = 120 + 100 * np.sin(xs / rng.uniform(1.5, 4)) * np.cos(ys / rng.uniform(1.5, 4))
        out.append(np.where(inside, texture, 0).clip(0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.mark.parametrize("factor", [2, 3, 5])
def test_a_bilinear_upscale_comes_back_not_blurred(factor: int) -> None:
    unscaled, boxed = Preprocessing(), Preprocessing(resample="box")
    for pixels in garments():
        sent = Image.fromarray(pixels).resize((28 * factor, 28 * factor), Image.Resampling.BILINEAR)
        back = image_to_pixels(sent, unscaled).astype(int)
        assert np.abs(back - pixels).max() <= 2  # the upscaler's own 8-bit rounding
        assert np.abs(image_to_pixels(sent, boxed).astype(int) - pixels).max() > 10  # box alone leaves it blurred


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "I;16"])
def test_unscale_holds_in_colour_with_alpha_and_at_16_bits(mode: str) -> None:
    pixels = garments(3)
    rgb = np.stack(list(pixels), -1)
    if mode == "I;16":
        upright = Image.fromarray(pixels[0].astype(np.uint16) * 257)
        want = pixels[0]
    else:
        upright = Image.fromarray(rgb).convert(mode)
        want = rgb
    sent = upright.resize((56, 56), Image.Resampling.BILINEAR)
    contract = Preprocessing(color="L" if mode == "I;16" else "RGB")
    assert np.abs(image_to_pixels(sent, contract).astype(int) - want).max() <= 2


@pytest.mark.parametrize("method", ["BICUBIC", "LANCZOS", "HAMMING"])
def test_other_upscales_and_photographs_go_through_box(method: str) -> None:
    """Only nearest and bilinear upscales are undone; anything else is area-averaged exactly as before."""
    unscaled, boxed = Preprocessing(), Preprocessing(resample="box")
    for pixels in garments(10):
        sent = Image.fromarray(pixels).resize((56, 56), Image.Resampling[method])
        np.testing.assert_array_equal(image_to_pixels(sent, unscaled), image_to_pixels(sent, boxed))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 84), dtype=np.uint8))
    np.testing.assert_array_equal(image_to_pixels(noise, unscaled), image_to_pixels(noise, boxed))


def test_an_exif_rotated_bilinear_upscale_equals_its_upright_twin() -> None:
    pixels = garments(1)[0]
    sent = Image.fromarray(pixels).resize((56, 84), Image.Resampling.BILINEAR)  # 2x wide, 3x high
    upright = image_to_pixels(sent)
    assert np.abs(upright.astype(int) - pixels).max() <= 2
    stored = sent.transpose(Image.Transpose.ROTATE_90)  # as a camera stores it; EXIF says rotate back
    back = image_to_pixels(stored, transpose=Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(back, upright)


def test_a_torch_bilinear_upscale_comes_back_too() -> None:
    """torch's interpolate (align_corners=False), what a PyTorch pipeline upscales with."""
    import torch  # the training extra, which make test installs; the service itself has no torch

    for pixels in garments(5):
        up = torch.nn.functional.interpolate(
            torch.from_numpy(pixels.astype(np.float32))[None, None], scale_factor=2, mode="bilinear"
        )
        sent = Image.fromarray(np.clip(np.rint(up[0, 0].numpy()), 0, 255).astype(np.uint8))
        assert np.abs(image_to_pixels(sent).astype(int) - pixels).max() <= 2
