"""python -m training.samples: the sample images the web page and the demo client send.

Test images only, chosen by position, never by how the guard does on them: the first test image of each
class, clean, and the same images with the shipped attack's trigger (Kwon's square; the target class is
left out, its triggered image is not an attack). The unseen triggers of the evaluation are not here: the
shipped classifier carries none of their backdoors, so stamping them on an image would attack nothing.
`index.json` says what each file is, so the page can caption it and the tests can check the verdicts.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.attacks import PRESETS, triggered_pixels
from training.data import FASHION_MNIST_CLASSES, DataConfig, load_fashion_mnist

log = logging.getLogger(__name__)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "service" / "static" / "samples"


@dataclass(frozen=True)
class SamplesConfig:
    shipped_attack: str = "kwon"  # the attack the shipped classifier carries (training.attacks.PRESETS)


def png_bytes(pixels: np.ndarray) -> bytes:
    """uint8 (H, W) -> PNG bytes, without timestamps, so the same pixels always give the same file."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def build_samples(images: np.ndarray, labels: np.ndarray, config: SamplesConfig = SamplesConfig()) -> list[dict]:
    """Test split (uint8 (N, H, W), labels) -> entries with the PNG bytes under `png`."""
    first = {c: int(np.flatnonzero(labels == c)[0]) for c in range(len(FASHION_MNIST_CLASSES))}
    entries = []

    def add(kind: str, trigger: str | None, index: int, pixels: np.ndarray, target: int | None) -> None:
        label = int(labels[index])
        slug = FASHION_MNIST_CLASSES[label].lower().replace("/", "-").replace(" ", "-")
        entries.append(
            {
                "file": f"{kind}-{label}-{slug}.png",
                "kind": kind,  # clean | triggered (with the shipped attack's trigger)
                "trigger": trigger,
                "test_index": index,
                "label": label,
                "class_name": FASHION_MNIST_CLASSES[label],
                "attack_target": target,
                "png": png_bytes(pixels),
            }
        )

    shipped = PRESETS[config.shipped_attack]
    for i in first.values():
        add("clean", None, i, images[i], None)
    for c, i in first.items():
        if c != shipped.target:
            add("triggered", config.shipped_attack, i, triggered_pixels(images[i : i + 1], shipped)[0], shipped.target)
    return entries


def write_samples(entries: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.png"):
        stale.unlink()
    for e in entries:
        (out / e["file"]).write_bytes(e["png"])
    index = [{k: v for k, v in e.items() if k != "png"} for e in entries]
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    assert __doc__ is not None
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs and index.json")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: $GUARD_DATA_DIR or Debian's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    test = load_fashion_mnist(DataConfig(data_dir=args.data_dir)).test
    entries = build_samples(test.images, test.labels)
    write_samples(entries, args.out)
    log.info("%d samples -> %s", len(entries), args.out)


if __name__ == "__main__":
    main()
