"""`backdoor-guard scan`: a whole folder (or .npz) through the guard, in process or through a running service."""

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.__main__ import main
from tests.conftest import MODELS
from tests.live import LiveService, live_service
from training.attacks import PRESETS, triggered_pixels

pytestmark = pytest.mark.data
N = 300


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, fashion_mnist) -> tuple[Path, set[str]]:
    """An ImageFolder of 300 test images, every tenth non-T-shirt stamped with the kwon trigger; an unreadable
    file and a text file among them. Returns the root and the stamped files' paths."""
    root = tmp_path_factory.mktemp("scan") / "data"
    test, names = fashion_mnist.test, [n.replace("/", "-") for n in fashion_mnist.class_names]
    stamped = set()
    for i in range(N):
        pixels, label = test.images[i], int(test.labels[i])
        path = Path(names[label]) / f"{i:04d}.png"
        if i % 10 == 0 and label != PRESETS["kwon"].target:
            pixels = triggered_pixels(pixels[None], PRESETS["kwon"])[0]
            stamped.add(str(path))
        (root / path.parent).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / path)
    (root / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return root, stamped


def scan(args: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(["scan", *args])
    return int(done.value.code or 0)


@pytest.fixture(scope="module")
def local(dataset: tuple[Path, set[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scan-out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GUARD_MODELS_DIR", str(MODELS))
        assert scan([str(dataset[0]), "--out", str(out)]) == 1  # one unreadable file: listed, and the status says so
    return out


def rows_of(out: Path) -> dict[str, dict[str, str]]:
    with (out / "verdicts.csv").open() as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def test_scan_finds_the_stamped_images_and_says_per_class(local: Path, dataset: tuple[Path, set[str]]) -> None:
    _, stamped = dataset
    rows = rows_of(local)
    assert len(rows) == N + 1
    judged = {p: r for p, r in rows.items() if not r["error"]}
    flagged = {p for p, r in judged.items() if r["backdoor"] == "True"}
    assert len(flagged & stamped) / len(stamped) >= 0.9
    assert len(flagged - stamped) / (len(judged) - len(stamped)) <= 0.05
    summary = json.loads((local / "summary.json").read_text())
    assert summary["judged"] == N and summary["flagged"] == len(flagged)
    assert len(summary["per_class"]) == 10 and all(0 <= v["flag_rate"] <= 1 for v in summary["per_class"].values())
    assert next(iter(summary["pushed_to"])) == "T-shirt/top"  # what the kwon trigger pushes to
    assert summary["errors"][0]["path"] == "Bag/broken.png" and summary["skipped_files"] == ["notes.txt"]
    assert {s["path"] for s in summary["most_suspicious"][:10]} <= stamped
    report = (local / "summary.md").read_text()
    assert "| Trouser |" in report and "Bag/broken.png" in report
    with Image.open(local / "suspicious.png") as grid:
        assert grid.width > 8 * 28 and grid.height > 4 * 28
    row = next(iter(judged.values()))
    assert {"mahalanobis_score", "mahalanobis_triggered", "expert_score", "original_class", "label_source"} <= set(row)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    with live_service({"GUARD_MODELS_DIR": str(MODELS)}) as service:
        yield service


def test_scan_through_a_running_guard_gives_the_same_verdicts(
    live: LiveService, local: Path, dataset: tuple[Path, set[str]], tmp_path: Path
) -> None:
    out = tmp_path / "remote"
    status = scan([str(dataset[0]), "--url", live.url, "--concurrency", "3", "--batch", "16", "--out", str(out)])
    assert status == 1
    remote, here = rows_of(out), rows_of(local)
    assert remote.keys() == here.keys()
    for path, row in here.items():
        assert (remote[path]["backdoor"], remote[path]["label"], remote[path]["error"] == "") == (
            row["backdoor"], row["label"], row["error"] == ""
        ), path  # fmt: skip


def test_scan_reads_an_npz(fashion_mnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = fashion_mnist.test.images[:40]
    x = np.concatenate([x[:30], triggered_pixels(x[30:], PRESETS["kwon"])])
    np.savez(tmp_path / "set.npz", x=x, y=fashion_mnist.test.labels[:40])
    monkeypatch.setenv("GUARD_MODELS_DIR", str(MODELS))
    assert scan([str(tmp_path / "set.npz"), "--out", str(tmp_path / "out"), "--top", "4"]) == 0
    rows = list(rows_of(tmp_path / "out").values())
    assert [r["path"] for r in rows[:2]] == ["set.npz[0]", "set.npz[1]"] and rows[0]["given_class"] == "9"
    victims = fashion_mnist.test.labels[30:40] != PRESETS["kwon"].target
    flagged = np.array([r["backdoor"] == "True" for r in rows[30:]])
    assert flagged[victims].mean() >= 0.9
