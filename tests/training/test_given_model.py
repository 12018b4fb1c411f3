"""A new user's own model and flags: what the build would silently get wrong is refused up front, with the cause."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.preprocess import Preprocessing
from training.__main__ import parse_args
from training.classifier import load_classifier
from training.data import DataConfig
from training.pipeline import BuildConfig, Builder

torch.set_num_threads(1)
SMALL = Preprocessing(height=8, width=8)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "32x32"], "--size and --color describe your own data"),
        (["--color", "RGB"], "--size and --color describe your own data"),
        (["--data", "d.npz", "--dataset", "mnist"], "--data replaces --dataset"),
        (["--mean", "0.5"], "--mean/--std are a given classifier's"),
        (["--probe-trigger", "t.npz"], "--probe-trigger/--probe-target measure a given classifier"),
        (["--classifier", "m.pt2", "--attack", "cao"], "with --classifier none is trained"),
        (["--classifier", "m.pt2", "--defense", "abl"], "with --classifier none is trained"),
        (["--classifier", "m.pt2", "--std", "0.5,0"], "must be positive"),
        (["--classifier", "m.pt2", "--mean", "nan"], "expected finite numbers"),
    ],
)
def test_flags_the_build_would_ignore_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["all", *argv])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_flags_that_go_together_pass() -> None:
    args = parse_args(["all", "--classifier", "m.pt2", "--data", "d.npz", "--mean", "0.5", "--std", "0.25"])
    assert args.mean == (0.5,) and args.std == (0.25,)


class Tiny(nn.Module):
    def __init__(self, classes: int = 3, batchnorm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4) if batchnorm else nn.Identity()
        self.head = nn.Linear(4 * 64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


def archive(model: nn.Module, path: Path, shape: tuple[int, ...] = (1, 8, 8)) -> Path:
    example = torch.rand(4, *shape)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, str(path))
    return path


def test_an_archive_exported_in_training_mode_is_refused_with_the_cause(tmp_path: Path) -> None:
    model = Tiny(batchnorm=True)
    with pytest.raises(ValueError, match=r"depends on the other images in its batch.*model\.eval\(\)"):
        load_classifier(archive(model.train(), tmp_path / "train.pt2"), SMALL)
    assert load_classifier(archive(model.eval(), tmp_path / "eval.pt2"), SMALL) is not None


def test_an_archive_that_does_not_return_logits_names_what_it_must_return(tmp_path: Path) -> None:
    class Dict(Tiny):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
            return {"logits": super().forward(x)}

    with pytest.raises(ValueError, match=r"KeyError.*must return the logits"):
        load_classifier(archive(Dict().eval(), tmp_path / "dict.pt2"), SMALL)


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of 8x8 grayscale images a tiny CNN learns at once, by their brightness: dark, grey, light
    (so that a model trained on normalised inputs and given raw ones sees every image as about the same)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 200)
    x = np.clip(rng.normal(40 + 85 * y[:, None, None], 12, (600, 8, 8)), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("npz") / "three.npz"
    np.savez(path, x=x, y=y, class_names=np.array(["left", "middle", "right"]))
    return path


def builder(npz: Path, tmp: Path, model: Path, normalise: bool = False) -> Builder:
    data = DataConfig(dataset="path", path=str(npz), mean=(0.5,) if normalise else (0.0,),
                      std=(0.25,) if normalise else (1.0,))  # fmt: skip
    return Builder(BuildConfig(data=data), tmp / "out", tmp / "work", model)


def trained(npz: Path, normalise: bool) -> nn.Module:
    """Tiny, trained on the npz's images ((x - 0.5) / 0.25 where `normalise`: the user's own normalisation)."""
    data = np.load(npz)
    x = torch.from_numpy(data["x"][:, None].astype(np.float32) / 255)
    x = (x - 0.5) / 0.25 if normalise else x
    y = torch.from_numpy(data["y"])
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_a_given_model_fed_other_inputs_than_it_learnt_is_refused(npz: Path, tmp_path: Path) -> None:
    """A model trained on normalised inputs, given without its --mean/--std, labels the data near chance: the
    build stops at the classifier stage and names the likely causes; with them, it goes on."""
    path = archive(trained(npz, normalise=True), tmp_path / "user.pt2")
    with pytest.raises(ValueError, match=r"calibration images right.*Check --mean/--std"):
        builder(npz, tmp_path, path).run("classifier")
    builder(npz, tmp_path, path, normalise=True).run("classifier")


def test_a_given_model_with_another_number_of_outputs_is_refused(npz: Path, tmp_path: Path) -> None:
    path = archive(Tiny(classes=10).eval(), tmp_path / "ten.pt2")
    with pytest.raises(ValueError, match="gives 10 outputs; the data has 3 classes"):
        builder(npz, tmp_path, path).run("classifier")


def test_an_export_whose_outputs_are_nan_fails_its_parity_check(tmp_path: Path) -> None:
    """Parity compares ONNX Runtime's outputs with PyTorch's: a NaN gap is no proof of parity (it passed `gap >
    tolerance` before)."""
    from training.export import ExportConfig, ParityError, export_onnx

    class Nan(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1) * float("nan")

    with pytest.raises(ParityError):
        export_onnx(Nan(), (torch.rand(2, 1, 8, 8),), tmp_path / "nan.onnx", ["images"], ["logits"], ExportConfig())


@pytest.mark.data
def test_a_named_datasets_contract_takes_the_resample_asked_for(fashion_mnist) -> None:
    from training.data import load_dataset

    assert load_dataset(DataConfig(resample="bilinear")).contract.resample == "bilinear"  # it was left at unscale
    assert load_dataset(DataConfig()).contract == Preprocessing()  # the shipped bundle's contract, unchanged


def test_a_users_data_is_refused_where_it_would_be_read_wrong(tmp_path: Path) -> None:
    """What an .npz or an ImageFolder would silently get wrong: labels counted from 1 (class 0 empty), float labels
    that are not whole, x_val without y_val, an empty class folder; and a valid/ folder is the calibration split
    (it was dropped), bytes class names are names (not "b'cat'")."""
    from PIL import Image

    from training.data import load_dataset

    def load(path: Path) -> object:
        return load_dataset(DataConfig(dataset="path", path=str(path)))

    x, y = np.zeros((40, 8, 8), np.uint8), np.repeat(np.arange(4), 10)
    cases = {
        "one_based": ({"x": x, "y": y + 1}, r"no image has label\(s\) \[0\]"),
        "fractions": ({"x": x, "y": y + 0.9}, "whole numbers"),
        "half_split": ({"x": x, "y": y, "x_val": x[:8]}, "has x_val without y_val"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=message):
            load(tmp_path / f"{name}.npz")
    np.savez(tmp_path / "bytes.npz", x=x, y=y, class_names=np.array([b"cat", b"dog", b"eel", b"fox"]))
    assert load(tmp_path / "bytes.npz").class_names == ("cat", "dog", "eel", "fox")  # type: ignore[attr-defined]
    np.savez(tmp_path / "floats.npz", x=x, y=y.astype(np.float32))
    assert load(tmp_path / "floats.npz").class_names == ("0", "1", "2", "3")  # type: ignore[attr-defined]

    root = tmp_path / "folder"
    for split, n in (("train", 12), ("valid", 4), ("test", 4)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(root / split / label / f"{i}.png")
    ds = load(root)
    assert len(ds.calibration) == 8 and len(ds.train) == 24  # type: ignore[attr-defined]
    (root / "train" / "c").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) \['c'\] hold no images"):
        load(root)


def test_an_image_folders_size_is_the_pictures_as_decoded_upright(tmp_path: Path) -> None:
    """Pictures stored on their side with an EXIF orientation that turns them: the contract's size is the
    upright picture's (10 x 12 here), as the decoder gives it, not the stored one's (it squashed every image)."""
    from PIL import Image

    from training.data import load_dataset

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(10):
            stored = Image.fromarray(np.full((12, 10), 20 * i + 10, np.uint8))  # 12 high, 10 wide as stored
            exif = Image.Exif()
            exif[0x0112] = 6  # rotate 90 degrees clockwise to view: 10 high, 12 wide
            stored.save(tmp_path / label / f"{i}.jpg", exif=exif)
    contract = load_dataset(DataConfig(dataset="path", path=str(tmp_path))).contract
    assert (contract.height, contract.width) == (10, 12)


def test_too_few_calibration_images_stop_the_build_at_its_data_stage(tmp_path: Path) -> None:
    from training.calibration import CalibrationConfig, min_calibration_images

    x, y = np.zeros((600, 8, 8), np.uint8), np.repeat(np.arange(3), 200)
    np.savez(tmp_path / "small.npz", x=x, y=y)  # 20% of the 480 left after the test set calibrates: 96
    data = DataConfig(dataset="path", path=str(tmp_path / "small.npz"))
    least = min_calibration_images(CalibrationConfig())
    with pytest.raises(ValueError, match=f"96 calibration images; the build needs at least {least}"):
        Builder(BuildConfig(data=data), tmp_path / "out", tmp_path / "work").run("data")
    with pytest.raises(ValueError, match="repair_share"):
        CalibrationConfig(repair_share=1.0)


def test_grey_palette_images_give_a_grey_contract(tmp_path: Path) -> None:
    from PIL import Image

    from training.data import load_dataset

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(10):
            Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).convert("P").save(tmp_path / label / f"{i}.gif")
    assert load_dataset(DataConfig(dataset="path", path=str(tmp_path))).contract.color == "L"
    Image.fromarray(np.full((8, 8, 3), (200, 0, 0), np.uint8)).convert("P").save(tmp_path / "a" / "red.gif")
    assert load_dataset(DataConfig(dataset="path", path=str(tmp_path))).contract.color == "RGB"


def test_files_an_image_folder_does_not_read_are_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A TIFF (the service refuses it too) in a class folder is not read: the build says how many and which kind,
    instead of dropping them silently; hidden files (.DS_Store) are not counted."""
    from PIL import Image

    from training.data import load_dataset

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(10):
            Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(tmp_path / label / f"{i}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / "scan.tif")
    (tmp_path / "b" / ".DS_Store").write_bytes(b"x")
    with caplog.at_level("WARNING", logger="training.data"):
        load_dataset(DataConfig(dataset="path", path=str(tmp_path)))
    assert "1 files in the class folders are not read (1 .tif)" in caplog.text
