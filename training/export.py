"""Stage 9 (and the STRIP bank of stage 7): export every model the service runs to ONNX, verify, write the manifest.

Exporting means verifying (as timm does): onnx.checker with full_check, then ONNX Runtime against PyTorch
on real images; a gap above the tolerance fails the export.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service.bundle import MANIFEST, sha256_file
from training.common import copy_checkpoint, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18  # ONNX opset of every exported graph
    parity_tolerance: float = 1e-4  # max |ONNX Runtime - PyTorch| allowed on any output
    parity_images: int = 512  # real calibration images used for the parity check


class ParityError(AssertionError):
    """ONNX Runtime disagrees with PyTorch beyond the tolerance."""


class ReversedTriggers(nn.Module):
    """Stamps one label's Neural Cleanse trigger onto a batch: (images, label[1]) -> stamped."""

    masks: torch.Tensor
    patterns: torch.Tensor

    def __init__(self, masks: np.ndarray, patterns: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("masks", torch.from_numpy(masks[:, None]).float())  # (L, 1, H, W)
        self.register_buffer("patterns", torch.from_numpy(patterns).float())  # (L, C, H, W)

    def forward(self, images: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        mask = self.masks.index_select(0, label)  # (1, 1, H, W), broadcast over the batch
        pattern = self.patterns.index_select(0, label)
        return images * (1 - mask) + mask * pattern


def _io_spec(values: Any) -> list[dict[str, Any]]:
    spec = []
    for v in values:
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        spec.append({"name": v.name, "shape": dims, "dtype": dtype})
    return spec


def export_onnx(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    config: ExportConfig,
    batch_inputs: tuple[str, ...] = ("images",),
) -> dict[str, Any]:
    """torch.onnx (dynamo) with a dynamic batch axis, one self-contained file, then parity on `example`."""
    module = module.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = tuple({0: batch} if name in batch_inputs else None for name in input_names)  # positional
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter, not ours
        torch.onnx.export(
            module, example, str(path), input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic, opset_version=config.opset, dynamo=True, external_data=False,
        )  # fmt: skip
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    gap = parity(module, path, example, input_names)
    if not gap <= config.parity_tolerance:  # a NaN gap (the model gives NaN) fails too
        raise ParityError(f"{path.name}: ONNX Runtime differs from PyTorch by {gap:.3g} > {config.parity_tolerance}")
    log.info("exported %s (%d bytes), parity %.2e", path.name, path.stat().st_size, gap)
    return {
        "path": path.name,
        "sha256": sha256_file(path),
        "inputs": _io_spec(model.graph.input),
        "outputs": _io_spec(model.graph.output),
        "parity_max_abs_diff": gap,
    }


@torch.no_grad()
def parity(module: nn.Module, path: Path, example: tuple[torch.Tensor, ...], input_names: list[str]) -> float:
    """Max |ONNX Runtime - PyTorch| over every output."""
    expected = module(*example)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.numpy() for n, t in zip(input_names, example, strict=True)})
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected, strict=True))


def write_bank(path: Path, bank: np.ndarray) -> dict[str, Any]:
    """The STRIP bank: float32 (M, C, H, W) clean calibration images, exactly what gets superimposed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, bank.astype(np.float32))
    return {"path": path.name, "sha256": sha256_file(path), "shape": list(bank.shape), "dtype": "float32"}


def copy_checkpoints(folder: Path, sources: dict[str, Path]) -> dict[str, dict[str, str]]:
    """Copy each source checkpoint (and its .json config) into the bundle; name -> {path, sha256}."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, src in sources.items():
        dst = folder / f"{name}{src.suffix}"
        copy_checkpoint(src, dst)
        entries[name] = {"path": f"{folder.name}/{dst.name}", "sha256": sha256_file(dst)}
    return entries


def update_manifest(out: Path, drop: tuple[str, ...] = (), **sections: Any) -> dict[str, Any]:
    """Read-modify-write models/manifest.json; each stage owns the sections it passes (and those it drops)."""
    import json

    path = out / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    for key in drop:
        manifest.pop(key, None)
    manifest.update(sections)
    write_json(path, manifest)
    return manifest


def torch_models(root: Path) -> dict[str, nn.Module]:
    """Rebuild every exported model of a bundle from its shipped PyTorch checkpoints (parity, benchmarks)."""
    from service.bundle import read_manifest
    from service.preprocess import Preprocessing
    from training.autoencoders import DetriggerAE, MaskedAE, MaskedRestorer
    from training.classifier import load_classifier
    from training.common import load_checkpoint
    from training.neural_cleanse import NeuralCleanseResult

    manifest = read_manifest(root)
    contract = Preprocessing(**manifest["preprocessing"])
    ck = {name: root / e["path"] for name, e in manifest["checkpoints"].items()}
    meta, state = load_checkpoint(ck["detrigger_ae"])
    detrigger = DetriggerAE(meta["config"]["width"], contract.channels)
    detrigger.load_state_dict(state)
    meta, state = load_checkpoint(ck["masked_ae"])
    masked = MaskedAE(meta["config"]["width"], contract.channels)
    masked.load_state_dict(state)
    nc = NeuralCleanseResult.load(ck["reversed_triggers"])
    patch, sharpen = meta["config"]["patch"], meta["config"]["sharpen"]
    return {
        "classifier": load_classifier(ck["classifier"], contract),
        "detrigger_ae": detrigger.eval(),
        "masked_ae": MaskedRestorer(masked, patch, sharpen, contract.height, contract.width).eval(),
        "reversed_triggers": ReversedTriggers(nc.masks, nc.patterns).eval(),
        **{
            name: load_classifier(ck[name], contract)
            for name in ("repaired_classifier", "backdoor_expert")
            if name in ck
        },
    }
