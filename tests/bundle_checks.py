"""Reference checks shared by the smoke and shipped-bundle tests: PyTorch checkpoints vs their ONNX exports."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from service.bundle import read_manifest
from training.autoencoders import DetriggerAE, MaskedAE, MaskedRestorer
from training.classifier import load_classifier
from training.common import load_checkpoint
from training.export import ReversedTriggers
from training.neural_cleanse import NeuralCleanseResult

REQUIRED_KEYS = {
    "files", "preprocessing", "class_names", "thresholds", "neural_cleanse", "configs", "metrics", "checkpoints",
}  # fmt: skip


def torch_models(root: Path) -> dict[str, torch.nn.Module]:
    """Rebuild every exported model from the bundle's PyTorch checkpoints."""
    manifest = read_manifest(root)
    ck = {name: root / e["path"] for name, e in manifest["checkpoints"].items()}
    meta, state = load_checkpoint(ck["detrigger_ae"])
    detrigger = DetriggerAE(meta["config"]["width"])
    detrigger.load_state_dict(state)
    meta, state = load_checkpoint(ck["masked_ae"])
    masked = MaskedAE(meta["config"]["width"])
    masked.load_state_dict(state)
    nc = NeuralCleanseResult.load(ck["reversed_triggers"])
    return {
        "classifier": load_classifier(ck["classifier"]),
        "detrigger_ae": detrigger.eval(),
        "masked_ae": MaskedRestorer(masked, meta["config"]["patch"], meta["config"]["sharpen"]).eval(),
        "reversed_triggers": ReversedTriggers(nc.masks, nc.patterns).eval(),
    }


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
