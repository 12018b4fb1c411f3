"""Reference checks shared by the smoke and shipped-bundle tests: PyTorch checkpoints vs their ONNX exports."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from service.bundle import read_manifest
from training.export import torch_models

REQUIRED_KEYS = {
    "files", "preprocessing", "class_names", "thresholds", "neural_cleanse", "configs", "metrics", "checkpoints",
}  # fmt: skip


@torch.no_grad()
def parity_gaps(root: Path, images: np.ndarray) -> dict[str, float]:
    """Max |ONNX Runtime - PyTorch| per model over real images (and every label for the trigger stamper)."""
    manifest = read_manifest(root)
    gaps = {}
    for name, model in torch_models(root).items():
        session = ort.InferenceSession(str(root / manifest["files"][name]["path"]), providers=["CPUExecutionProvider"])
        x = torch.from_numpy(images)
        if name == "reversed_triggers":
            labels = range(len(manifest["class_names"]))
            pairs = [
                (session.run(None, {"images": images, "label": np.array([t])})[0], model(x, torch.tensor([t])))
                for t in labels
            ]
        else:
            expected = model(x)
            expected = expected if isinstance(expected, tuple) else (expected,)
            pairs = list(zip(session.run(None, {"images": images}), expected, strict=True))
        gaps[name] = max(float(np.abs(got - want.numpy()).max()) for got, want in pairs)
    return gaps
