"""KServe v2-style health and model metadata."""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service import __version__, oip
from service.errors import NotReady, UnknownModel, responses
from service.guard import fused_surprise
from service.runtime import Runtime, RuntimeDep
from service.schemas import Health, ModelMetadata, ServerMetadata

router = APIRouter(prefix="/v2")


@router.get("", response_model=ServerMetadata, summary="The server: name, version and the model it guards")
async def server_metadata(runtime: RuntimeDep) -> ServerMetadata:
    return ServerMetadata(version=__version__, extensions=oip.EXTENSIONS, models=[runtime.bundle.manifest["name"]])


@router.get("/health/live", response_model=Health, summary="The process is up")
async def live() -> Health:
    return Health(status="live")


@router.get(
    "/health/ready",
    response_model=Health,
    summary="Every model is loaded and a warm-up inference passed",
    responses={503: {"model": Health, "description": "not ready: warming up, or the start-up self-test failed"}},
)
async def ready(runtime: RuntimeDep) -> Any:
    if not runtime.ready:
        detail = runtime.warmup_error or "warming up"
        return JSONResponse(Health(status="not_ready", detail=detail).model_dump(), status_code=503)
    return Health(status="ready")


def model_named(runtime: Runtime, name: str, version: str | None = None) -> str:
    """The guarded model's name, if `name` (and `version`, where the route has one) are this service's; else 404."""
    model = runtime.bundle.manifest["name"]
    if name != model:
        raise UnknownModel(f"no model named {name!r}; this service guards {model!r}")
    if version is not None and version != oip.MODEL_VERSION:
        raise UnknownModel(f"model {model!r} has no version {version!r}; it has version {oip.MODEL_VERSION}")
    return model


def _served_thresholds(runtime: RuntimeDep) -> dict[str, Any]:
    """Thresholds as the service applies them (with overrides), without the fusion tables."""
    out: dict[str, Any] = {"target_fpr": runtime.bundle.manifest["thresholds"]["target_fpr"]}
    if not runtime.guarded:
        return {**out, "guard": "off"}
    for signal in runtime.pipeline.signals:
        out[signal.name] = {"threshold": signal.threshold} if signal.threshold is not None else {"rule": "label_change"}
        if signal.name == "strip":
            out["strip"]["n"] = getattr(signal, "n", None)
    assert runtime.pipeline.fusion is not None
    threshold = runtime.pipeline.fusion.threshold
    surprise = float(fused_surprise(threshold))  # on guard_fused_surprise's scale, for dashboards and alerts
    out["fused"] = {"threshold": threshold, "surprise": surprise if math.isfinite(surprise) else None}
    return out


def oip_outputs(runtime: Runtime) -> set[str]:
    """The tensors /v2/models/{name}/infer answers with, for this bundle and setting."""
    signals = [s.name for s in runtime.pipeline.signals] if runtime.guarded else []
    return oip.output_names(signals, runtime.guarded)


@router.get(
    "/models/{name}",
    response_model=ModelMetadata,
    summary="The guarded model: inputs, classes, thresholds and the Neural Cleanse scan",
    responses=responses(UnknownModel, NotReady, oip=True),
)
async def model_metadata(name: str, runtime: RuntimeDep) -> ModelMetadata:
    manifest = runtime.bundle.manifest
    model_named(runtime, name)
    classifier = manifest["files"]["classifier"]
    metrics = {k: v for k, v in manifest.get("metrics", {}).items() if k != "stage_seconds"}
    return ModelMetadata(
        name=manifest["name"],
        sha256=classifier["sha256"],
        versions=[oip.MODEL_VERSION],
        bundle_sha256=runtime.bundle.digest,
        providers=runtime.bundle.sessions["classifier"].get_providers(),
        inputs=[
            {
                "name": oip.INPUT,
                "datatype": "FP32",
                "shape": [-1, *runtime.bundle.preprocessing.chw],
                "dtype": "float32",  # as the classifier's ONNX input says it; UINT8 is accepted too
            }
        ],
        outputs=[
            {"name": name, "datatype": oip.datatype_of(name), "shape": [-1]}
            for name in sorted(oip_outputs(runtime), key=oip.output_order)
        ],
        classifier_outputs=classifier["outputs"],
        preprocessing=manifest["preprocessing"],
        class_names=manifest["class_names"],
        thresholds=_served_thresholds(runtime),
        neural_cleanse=manifest["neural_cleanse"],
        metrics=metrics,
    )


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    summary="The guarded model's metadata, by version (its one version: the same as /v2/models/{name})",
    responses=responses(UnknownModel, NotReady, oip=True),
)
async def model_version_metadata(name: str, version: str, runtime: RuntimeDep) -> ModelMetadata:
    model_named(runtime, name, version)
    return await model_metadata(name, runtime)
