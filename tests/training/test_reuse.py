"""What depends only on the data is built once: the autoencoders come from the cache or from --reuse-from."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.bundle import sha256_file
from training import pipeline
from training.autoencoders import DetriggerConfig, MaskedAEConfig
from training.data import DataConfig
from training.pipeline import AUTOENCODERS, BuildConfig, Builder

STAGES = tuple(AUTOENCODERS)


def npz(path: Path, seed: int = 0, size: int = 12) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, (300, size, size), dtype=np.uint8), y=np.arange(300) % 3)
    return path


def config(data: Path) -> BuildConfig:
    return BuildConfig(
        data=DataConfig(dataset="path", path=str(data)),
        masked_ae=MaskedAEConfig(epochs=1),
        detrigger=DetriggerConfig(epochs=1),
    )


def build(cfg: BuildConfig, root: Path, cache: Path, reuse_from: Path | None = None) -> Builder:
    builder = Builder(cfg, root / "out", root / "work", reuse_from=reuse_from, cache=cache)
    for stage in STAGES:
        builder.run(stage)
    return builder


def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("an autoencoder was trained again")

    monkeypatch.setattr(pipeline, "train_masked", refuse)
    monkeypatch.setattr(pipeline, "train_detrigger", refuse)


def test_the_same_images_reuse_the_cached_autoencoders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, cache = npz(tmp_path / "a.npz"), tmp_path / "cache"
    first = build(config(data), tmp_path / "first", cache)
    meta = json.loads((first.work / "detrigger_ae.json").read_text())
    assert meta["data_digest"] == first.data_digest and meta["input_shape"] == [1, 12, 12]
    no_training(monkeypatch)
    second = build(config(data), tmp_path / "second", cache)
    for name in AUTOENCODERS.values():
        assert sha256_file(second.work / f"{name}.pt") == sha256_file(first.work / f"{name}.pt")


def test_other_images_or_another_config_train_again(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = build(config(npz(tmp_path / "a.npz")), tmp_path / "first", cache)
    other = build(config(npz(tmp_path / "b.npz", seed=1)), tmp_path / "other", cache)
    assert other.data_digest != first.data_digest
    longer = replace(config(tmp_path / "a.npz"), detrigger=DetriggerConfig(epochs=2))
    again = build(longer, tmp_path / "longer", cache)
    assert json.loads((again.work / "detrigger_ae.json").read_text())["config"]["epochs"] == 2
    assert len(list(cache.iterdir())) == 5  # two per dataset, and the longer de-trigger AE


def bundle_of(builder: Builder, root: Path) -> Path:
    """The smallest bundle --reuse-from reads: the manifest's preprocessing and checkpoints, and the files."""
    (root / "checkpoints").mkdir(parents=True)
    checkpoints = {}
    for name in AUTOENCODERS.values():
        for suffix in (".pt", ".json"):
            (root / "checkpoints" / f"{name}{suffix}").write_bytes((builder.work / f"{name}{suffix}").read_bytes())
        path = f"checkpoints/{name}.pt"
        checkpoints[name] = {"path": path, "sha256": sha256_file(root / path)}
    manifest = {"preprocessing": builder.contract.to_dict(), "checkpoints": checkpoints}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_reuse_from_a_bundle_takes_its_autoencoders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = npz(tmp_path / "a.npz")
    bundle = bundle_of(build(config(data), tmp_path / "first", tmp_path / "cache"), tmp_path / "bundle")
    no_training(monkeypatch)
    second = build(config(data), tmp_path / "second", tmp_path / "empty-cache", reuse_from=bundle)
    for name in AUTOENCODERS.values():
        assert sha256_file(second.work / f"{name}.pt") == sha256_file(bundle / "checkpoints" / f"{name}.pt")


def test_reuse_from_refuses_other_images_another_shape_or_a_changed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = bundle_of(build(config(npz(tmp_path / "a.npz")), tmp_path / "first", tmp_path / "cache"), tmp_path / "b")
    no_training(monkeypatch)
    with pytest.raises(ValueError, match="trained on other images"):
        build(config(npz(tmp_path / "other.npz", seed=3)), tmp_path / "x", tmp_path / "c", reuse_from=bundle)
    with pytest.raises(ValueError, match=r"take \[1, 12, 12\] images, this data gives \[1, 16, 16\]"):
        build(config(npz(tmp_path / "big.npz", size=16)), tmp_path / "y", tmp_path / "c", reuse_from=bundle)
    with (bundle / "checkpoints" / "masked_ae.pt").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="SHA-256"):
        build(config(tmp_path / "a.npz"), tmp_path / "z", tmp_path / "c", reuse_from=bundle)
