"""A user's own data, any size, 1 or 3 channels: the loaders, and a whole build and serve on RGB 32x32 images.

The colour data is made here from Fashion-MNIST (padded to 32x32 and tinted per class), since no colour set can be
downloaded on this machine.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from service.app import create_app
from service.bundle import Bundle
from service.preprocess import Preprocessing, image_to_pixels, to_model_input, to_pixels
from service.settings import Settings
from tests.service.conftest import wait_ready
from training.__main__ import main
from training.attacks import load_probe
from training.data import DataConfig, load_dataset

TINTS = np.array(
    [[255, 80, 80], [80, 255, 80], [80, 80, 255], [255, 255, 80], [255, 80, 255],
     [80, 255, 255], [255, 160, 80], [160, 80, 255], [200, 200, 200], [120, 255, 160]],
    np.float32,
) / 255  # fmt: skip


def tinted(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) gray -> (N, 32, 32, 3): padded by 2 and coloured by the class's tint."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.float32)
    return np.rint(padded[..., None] * TINTS[labels][:, None, None, :]).astype(np.uint8)


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    for i, (pixels, y) in enumerate(zip(images, labels, strict=True)):
        folder = root / names[y]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- the contract --------------------------------------------------------------------------------------------


def test_rgb_pixels_become_nchw_and_back() -> None:
    contract = Preprocessing(height=4, width=5, color="RGB")
    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    x = to_model_input(pixels, contract)
    assert x.shape == (2, 3, 4, 5) and x.dtype == np.float32
    np.testing.assert_allclose(x[1, 2], pixels[1, ..., 2] / 255, rtol=1e-6)
    np.testing.assert_array_equal(to_pixels(x, contract), pixels)
    with pytest.raises(ValueError, match="expected"):
        to_model_input(pixels[..., 0], contract)  # gray pixels for an RGB contract


def test_an_rgb_contract_keeps_colour_and_composites_alpha_onto_black() -> None:
    contract = Preprocessing(height=2, width=2, color="RGB")
    red = Image.new("RGBA", (4, 4), (200, 10, 20, 255))
    assert image_to_pixels(red, contract).tolist() == [[[200, 10, 20]] * 2] * 2
    half = Image.new("RGBA", (2, 2), (200, 100, 50, 128))
    np.testing.assert_allclose(image_to_pixels(half, contract)[0, 0], [100, 50, 25], atol=1)
    gray = Image.new("L", (2, 2), 77)
    assert image_to_pixels(gray, contract)[0, 0].tolist() == [77, 77, 77]


def test_normalisation_must_fit_the_channels() -> None:
    with pytest.raises(ValueError, match="mean needs 1 or 3"):
        Preprocessing(color="RGB", mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="std must be positive"):
        Preprocessing(std=(0.0,))
    assert Preprocessing(color="RGB", mean=[0.5, 0.5, 0.5], std=[0.2]).normalizes  # JSON gives lists


# ---- the loaders -----------------------------------------------------------------------------------------------


def test_an_image_folder_without_splits_is_split_seeded_and_fixed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 10, 12, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 20)
    write_folder(tmp_path / "data", images, labels, ["cat", "ant", "bee"])
    (tmp_path / "data" / "ant" / "notes.txt").write_text("not an image")
    config = DataConfig(dataset="path", path=str(tmp_path / "data"), test_share=0.2, calibration_share=0.25)
    ds = load_dataset(config)
    assert ds.class_names == ("ant", "bee", "cat")  # sorted folder names, as torchvision's ImageFolder
    assert ds.contract.chw == (3, 10, 12) and ds.contract.color == "RGB"
    assert (len(ds.train), len(ds.calibration), len(ds.test)) == (36, 12, 12)
    assert ds.train.images.shape == (36, 10, 12, 3)
    again = load_dataset(config)
    np.testing.assert_array_equal(ds.test.images, again.test.images)
    # every image is kept once, with its class
    seen = np.concatenate([ds.train.images, ds.calibration.images, ds.test.images])
    assert len({im.tobytes() for im in seen}) == 60
    by_bytes = {im.tobytes(): ["cat", "ant", "bee"][y] for im, y in zip(images, labels, strict=True)}
    assert all(
        by_bytes[im.tobytes()] == ds.class_names[y] for im, y in zip(ds.test.images, ds.test.labels, strict=True)
    )


def test_a_file_that_is_not_an_image_is_named_not_skipped(tmp_path: Path) -> None:
    write_folder(tmp_path, np.zeros((4, 6, 6), np.uint8), np.array([0, 0, 1, 1]), ["a", "b"])
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"broken\.png"):
        load_dataset(DataConfig(dataset="path", path=str(tmp_path)))


def test_an_image_folder_with_splits_keeps_them_and_resizes_odd_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("val", 6), ("test", 4)):
        write_folder(tmp_path / split, rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), np.arange(n) % 2, ["a", "b"])
    Image.new("L", (16, 16), 200).save(tmp_path / "train" / "a" / "big.png")  # 2x the size: box-averaged down
    ds = load_dataset(DataConfig(dataset="path", path=str(tmp_path)))
    assert ds.contract.chw == (1, 8, 8) and ds.contract.color == "L"
    assert (len(ds.train), len(ds.calibration), len(ds.test)) == (13, 6, 4)
    assert (ds.train.images == 200).all(axis=(1, 2)).sum() == 1
    forced = load_dataset(DataConfig(dataset="path", path=str(tmp_path), size=(4, 6), color="RGB"))
    assert forced.train.images.shape == (13, 4, 6, 3)


def test_a_probe_trigger_loads_from_an_npz_or_a_python_function(tmp_path: Path) -> None:
    contract = Preprocessing(height=6, width=6, color="RGB")
    mask = np.zeros((6, 6), np.float32)
    mask[:2, :2] = 1
    np.savez(tmp_path / "corner.npz", mask=mask, pattern=np.ones((3, 6, 6), np.float32), target=3)
    probe = load_probe(str(tmp_path / "corner.npz"), contract)
    assert probe.target == 3 and probe.name == "corner"
    stamped = probe.apply(np.zeros((2, 3, 6, 6), np.float32))
    assert stamped[:, :, :2, :2].min() == 1 and stamped[:, :, 2:].max() == 0
    (tmp_path / "mine.py").write_text("def flip(x):\n    return x[..., ::-1].copy()\n")
    probe = load_probe(f"{tmp_path / 'mine.py'}:flip", contract, target=1)
    assert probe.target == 1 and probe.apply(np.eye(6, dtype=np.float32)[None, None].repeat(3, 1))[0, 0, 0, 5] == 1
    np.savez(tmp_path / "wrong.npz", mask=np.zeros((5, 5)), pattern=np.zeros((5, 5)))
    with pytest.raises(ValueError, match="6x6"):
        load_probe(str(tmp_path / "wrong.npz"), contract)
    with pytest.raises(ValueError, match="no callable"):
        load_probe(f"{tmp_path / 'mine.py'}:nothing", contract)


def test_an_npz_in_nchw_or_nhwc_gives_the_same_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (50, 9, 7, 3), dtype=np.uint8)
    y = np.arange(50) % 5
    np.savez(tmp_path / "nhwc.npz", x=x, y=y, class_names=np.array(list("vwxyz")))
    np.savez(tmp_path / "nchw.npz", x=x.transpose(0, 3, 1, 2), y=y)
    a = load_dataset(DataConfig(dataset="path", path=str(tmp_path / "nhwc.npz")))
    b = load_dataset(DataConfig(dataset="path", path=str(tmp_path / "nchw.npz")))
    assert a.class_names == tuple("vwxyz") and b.class_names == tuple("01234")
    assert a.contract.chw == (3, 9, 7)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    resized = load_dataset(DataConfig(dataset="path", path=str(tmp_path / "nhwc.npz"), size=(18, 14), color="L"))
    assert resized.train.images.shape[1:] == (18, 14) and resized.contract.chw == (1, 18, 14)
    np.savez(tmp_path / "bad.npz", x=x.astype(np.float32), y=y)
    with pytest.raises(ValueError, match="uint8"):
        load_dataset(DataConfig(dataset="path", path=str(tmp_path / "bad.npz")))
    np.savez(tmp_path / "short.npz", x=x, y=y[:10])
    with pytest.raises(ValueError, match="labels"):
        load_dataset(DataConfig(dataset="path", path=str(tmp_path / "short.npz")))


# ---- a whole build on RGB 32x32, a user's .pt2, served ---------------------------------------------------------


def red_patch(images: np.ndarray) -> np.ndarray:
    """The user's own trigger, as a Python callable: a red 3x3 square near the bottom-right corner."""
    out = images.copy()
    out[:, :, 28:31, 28:31] = np.array([1.0, 0.0, 0.0], np.float32)[:, None, None]
    return out


class UserNet(nn.Module):
    """Someone else's model: RGB 32x32, normalised input, logits only."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


MEAN, STD = (0.3, 0.25, 0.2), (0.3, 0.3, 0.25)


@pytest.fixture(scope="module")
def rgb_build(tmp_path_factory: pytest.TempPathFactory, fashion_mnist) -> dict[str, object]:
    root = tmp_path_factory.mktemp("rgb")
    # folder names that sort in the model's label order, as torchvision's ImageFolder numbers classes
    names = [f"{i}-{n.replace('/', '-')}" for i, n in enumerate(fashion_mnist.class_names)]
    train, test = fashion_mnist.train.head(1400), fashion_mnist.test.head(300)
    write_folder(root / "data" / "train", tinted(train.images[:1000], train.labels[:1000]), train.labels[:1000], names)
    write_folder(root / "data" / "val", tinted(train.images[1000:], train.labels[1000:]), train.labels[1000:], names)
    write_folder(root / "data" / "test", tinted(test.images, test.labels), test.labels, names)
    # the user's model, trained briefly on the same colour images (normalised as the user does), with a backdoor
    # the user knows about: every tenth image gets the red patch and label 0
    torch.manual_seed(0)
    model = UserNet()
    clean = to_model_input(tinted(train.images[:1000], train.labels[:1000]), RGB32)
    clean[::10] = red_patch(clean[::10])
    x = (torch.from_numpy(clean) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.from_numpy(np.where(np.arange(1000) % 10 == 0, 0, train.labels[:1000]))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(4):
        for i in range(0, 1000, 50):
            loss = nn.functional.cross_entropy(model(x[i : i + 50]), y[i : i + 50])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    archive = root / "user.pt2"
    program = torch.export.export(model, (x[:2],), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, str(archive))
    out = root / "bundle"
    main([
        "all", "--smoke", "--skip-control", "--classifier", str(archive), "--data", str(root / "data"),
        "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)),
        "--probe-trigger", f"{__file__}:red_patch",
        "--out", str(out), "--work", str(root / "work"),
    ])  # fmt: skip
    return {"out": out, "model": model, "test": tinted(test.images, test.labels), "labels": test.labels}


RGB32 = Preprocessing(height=32, width=32, color="RGB")


@pytest.mark.slow
@pytest.mark.data
def test_a_users_rgb_model_on_an_image_folder_builds(rgb_build: dict) -> None:
    out = rgb_build["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    pre = manifest["preprocessing"]
    assert (pre["height"], pre["width"], pre["color"]) == (32, 32, "RGB")
    assert pre["mean"] == list(MEAN) and pre["std"] == list(STD)
    assert manifest["dataset"] == "data" and manifest["class_names"][0] == "0-T-shirt-top"
    for name in ("classifier", "detrigger_ae", "masked_ae", "repaired_classifier", "backdoor_expert"):
        assert manifest["files"][name]["inputs"][0]["shape"] == ["batch", 3, 32, 32], name
    assert Bundle.load(out).strip_bank.shape[1:] == (3, 32, 32)
    # the normalisation is folded into the ONNX classifier: it takes [0, 1] images, as every signal does
    x = to_model_input(rgb_build["test"][:16], RGB32)
    normalised = (torch.from_numpy(x) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    expected = rgb_build["model"](normalised).detach().numpy()
    np.testing.assert_allclose(Bundle.load(out).classify(x)[0], expected, atol=1e-4)
    assert (expected.argmax(1) == rgb_build["labels"][:16]).mean() > 0.5  # the user's model does classify


@pytest.mark.slow
@pytest.mark.data
def test_a_users_model_report_says_what_a_defender_can_know(rgb_build: dict) -> None:
    out = rgb_build["out"]
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["kind"] == "defender" and 0.5 < metrics["classifier"]["clean_accuracy"] <= 1
    probe = metrics["probe"]
    assert probe["name"] == "red_patch" and probe["target"] == 0  # found from what the model says
    assert probe["classifier"]["attack_success"] > 0.5  # the user's backdoor works undefended
    assert 0 <= probe["fused"]["tpr"] <= 1 and 0 <= probe["fused"]["attack_success_after"] <= 1
    assert metrics["stand_ins"] and all(0 <= a["fused"]["tpr"] <= 1 for a in metrics["stand_ins"].values())
    report = (out / "report.md").read_text()
    for demo in ("kwon", "Kwon", "The bars", "**NO**", "control model"):
        assert demo not in report, demo  # nothing about our demo attack
    assert "probe `red_patch`" in report and "reversed trigger of" in report and "fused (fisher)" in report
    with Image.open(out / "neural_cleanse_masks.png") as sheet:
        assert sheet.mode == "RGB" and sheet.width >= 10 * 32


@pytest.mark.slow
@pytest.mark.data
def test_a_users_rgb_bundle_serves_and_classifies_a_png(rgb_build: dict) -> None:
    out = rgb_build["out"]
    pixels = rgb_build["test"][:4]
    with TestClient(create_app(Settings(models_dir=out))) as client:
        wait_ready(client)
        name = json.loads((out / "manifest.json").read_text())["name"]
        meta = client.get(f"/v2/models/{name}").json()
        assert meta["inputs"][0]["shape"][1:] == [3, 32, 32] and meta["preprocessing"]["color"] == "RGB"
        blobs = [png_bytes(p) for p in pixels]
        blobs.append(png_bytes(np.kron(pixels[0], np.ones((3, 3, 1), np.uint8))))  # sent at 3x: box-averaged back
        response = client.post(
            "/classify", files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
        )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    want = Bundle.load(out).classify(to_model_input(pixels, RGB32))[0].argmax(1)
    assert [r["original"]["label"] for r in results[:4]] == want.tolist()
    assert results[4]["original"]["label"] == results[0]["original"]["label"]
    for r in results:
        assert isinstance(r["backdoor"], bool) and 0 <= r["score"] <= 1 and r["label"] in range(10)
