"""Response schemas of the API (`label` and `backdoor` are stable names clients depend on)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    name: str = Field(description="the bundle's name, e.g. fashion-mnist-kwon")
    sha256: str = Field(description="SHA-256 of the guarded classifier's ONNX file")


class Prediction(BaseModel):
    label: int
    class_name: str
    confidence: float = Field(description="softmax probability of the label")


class RestoredPrediction(Prediction):
    image: str | None = Field(None, description="the de-triggered image, base64 PNG (with ?include=restored)")


class ImageResult(BaseModel):
    index: int = Field(description="position of the file in the request")
    filename: str | None
    label: int = Field(
        description="the label to trust: the original if backdoor is false; else the label source's best label "
        "other than the original one (the attacker's, if the trigger worked) and any Neural Cleanse flagged"
    )
    class_name: str
    confidence: float
    backdoor: bool | None = Field(
        description="the fused verdict: does this image carry a backdoor trigger? null only with the guard off"
    )
    score: float | None = Field(
        description="fused score in [0, 1]: how far into the clean calibration tail the signals put the image together "
        "(1 - exp(-sum of each signal's -log(1 - clean percentile)); older bundles: the highest percentile)"
    )
    threshold: float | None = Field(description="backdoor is true when score exceeds this (null: guard off)")
    original: Prediction = Field(description="the classifier on the image as sent")
    restored: RestoredPrediction | None = Field(
        description="the classifier on the de-triggered image (null: guard off)"
    )
    repaired: Prediction | None = Field(
        None, description="the repaired classifier on the image as sent (bundles built with the repair stage)"
    )
    label_source: str = Field(
        description="where `label` comes from: original (not flagged); for a flagged image the bundle's label "
        "source: restored, repaired, or both (their predictions averaged)"
    )
    signals: dict[str, dict[str, Any]] = Field(
        description="each signal's own verdict (`triggered`), its evidence, threshold and clean percentile",
        examples=[
            {
                "detrigger": {"triggered": True, "label": 7, "class_name": "Sneaker", "confidence": 0.97},
                "mahalanobis": {"triggered": True, "score": 1372.5, "threshold": 221.8, "percentile": 1.0},
            }
        ],
    )


class ClassifyResponse(BaseModel):
    model: ModelRef
    guard: str = Field("on", description="on; off when the service runs with GUARD_SIGNALS=none (no verdicts)")
    results: list[ImageResult]


class ServerMetadata(BaseModel):
    name: str = "backdoor-guard"
    version: str
    extensions: list[str] = Field(description="protocol extensions: binary_tensor_data (binary tensors after the JSON)")
    models: list[str] = Field(description="the model this server guards; its metadata is at /v2/models/{name}")


class Health(BaseModel):
    status: str
    detail: str | None = None


class ModelMetadata(BaseModel):
    name: str
    sha256: str
    bundle_sha256: str = Field(
        description="the bundle's root digest: SHA-256 of manifest.json, which lists every file's SHA-256"
    )
    versions: list[str] = Field(description="the model's versions: one, also served at /v2/models/{name}/versions/{v}")
    platform: str = "onnxruntime"
    providers: list[str]
    inputs: list[dict[str, Any]] = Field(description="POST /v2/models/{name}/infer's input: images [-1, C, H, W]")
    outputs: list[dict[str, Any]] = Field(description="the tensors /v2/models/{name}/infer answers with")
    classifier_outputs: list[dict[str, Any]] = Field(description="the classifier's own ONNX outputs")
    preprocessing: dict[str, Any]
    class_names: list[str]
    thresholds: dict[str, Any] = Field(description="per-signal thresholds and the fused one, as served")
    neural_cleanse: dict[str, Any] = Field(
        description="the scan: anomaly index and mask norm per label, flagged labels"
    )
    metrics: dict[str, Any] = Field(description="what the bundle's build measured on its test split")
