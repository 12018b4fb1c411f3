"""POST /classify: multipart upload of one or more images -> label + backdoor verdict + evidence per image."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service.decode import png_base64
from service.errors import (
    BadImage,
    ClientGone,
    GuardError,
    GuardFailure,
    MalformedRequest,
    NoFiles,
    NotReady,
    Overloaded,
    RequestTimeout,
    TooLarge,
    TooManyFiles,
    Unauthorized,
    WrongContentType,
    responses,
)
from service.guard import GuardResult
from service.runtime import Runtime, RuntimeDep
from service.schemas import ClassifyResponse
from service.settings import Settings
from service.upload import UploadLimits, check_declared_length, read_uploads

log = logging.getLogger(__name__)
router = APIRouter()
CLASSIFY_ERRORS = (
    MalformedRequest, BadImage, Unauthorized, RequestTimeout, TooManyFiles, TooLarge, WrongContentType, NoFiles,
    GuardFailure, NotReady, Overloaded,
)  # fmt: skip


def upload_body(max_files: int) -> dict[str, Any]:
    """The OpenAPI request body of /classify, with this service's file limit."""
    files = {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "minItems": 1,
        "maxItems": max_files,
        "description": "one or more images: PNG, JPEG, WebP, BMP or GIF, any size and colour mode",
    }
    schema = {"type": "object", "required": ["files"], "properties": {"files": files}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


# The default limit; create_app documents its own app's GUARD_MAX_FILES.
UPLOAD_BODY = upload_body(Settings.model_fields["max_files"].default)


ApiKey = Annotated[str | None, Header(description="required when GUARD_API_KEY is set")]  # the X-API-Key header


def check_key(runtime: Runtime, given: str | None) -> None:
    expected = runtime.settings.api_key
    if expected is not None and not hmac.compare_digest((given or "").encode(), expected.get_secret_value().encode()):
        raise Unauthorized("missing or wrong X-API-Key header")


def admit(runtime: Runtime, x_api_key: str | None) -> None:
    """What refuses any guarded request before its body is read (/classify and /infer): key, readiness, queue."""
    check_key(runtime, x_api_key)
    if not runtime.ready:
        raise NotReady(runtime.warmup_error or "warming up; retry shortly", headers={"Retry-After": "1"})
    if runtime.batcher.full:
        raise runtime.batcher.overloaded()


def counted(runtime: Runtime, result: GuardResult) -> GuardResult:
    """A request's result, once it left the batcher: the queue gauge and the verdict counters."""
    runtime.metrics.queue.set(runtime.batcher.pending)
    runtime.metrics.observe_result(result)
    return result


def _admit(request: Request, runtime: Runtime, x_api_key: str | None) -> UploadLimits:
    """Everything that can be refused before a byte of the body is read: key, readiness, queue, declared size."""
    admit(runtime, x_api_key)
    s = runtime.settings
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
        raise WrongContentType("send multipart/form-data with one or more file parts named `files`")
    limits = s.upload_limits
    check_declared_length(request.headers.get("content-length"), limits)
    return limits


def _render(runtime: Runtime, result: GuardResult, names: list[str | None], with_images: bool) -> list[dict[str, Any]]:
    classes = runtime.bundle.class_names
    if not runtime.guarded:
        return [_render_plain(classes, result, i, name) for i, name in enumerate(names)]
    fusion = runtime.pipeline.fusion
    assert fusion is not None
    labels, confidence = result.labels, result.confidence
    percentiles = result.percentiles  # each signal's clean percentile, as the fused verdict weighed it
    out = []
    for i, name in enumerate(names):
        signals = {}
        for signal in runtime.pipeline.signals:
            evidence = signal.report(result.signals[signal.name], i)
            if "label" in evidence:
                evidence["class_name"] = classes[evidence["label"]]
            evidence["percentile"] = float(percentiles[signal.name][i])
            signals[signal.name] = evidence
        original, restored, repaired = result.original, result.restored, result.repaired
        out.append(
            {
                "index": i,
                "filename": name,
                "label": int(labels[i]),
                "class_name": classes[int(labels[i])],
                "confidence": float(confidence[i]),
                "backdoor": bool(result.backdoor[i]),
                "score": float(result.score[i]),
                "threshold": fusion.threshold,
                "original": {
                    "label": int(original.labels[i]),
                    "class_name": classes[int(original.labels[i])],
                    "confidence": float(original.confidence[i]),
                },
                "restored": {
                    "label": int(restored.labels[i]),
                    "class_name": classes[int(restored.labels[i])],
                    "confidence": float(restored.confidence[i]),
                    **({"image": png_base64(result.restored_images[i])} if with_images else {}),
                },
                "repaired": None
                if repaired is None
                else {
                    "label": int(repaired.labels[i]),
                    "class_name": classes[int(repaired.labels[i])],
                    "confidence": float(repaired.confidence[i]),
                },
                "label_source": result.source if result.backdoor[i] else "original",
                "signals": signals,
            }
        )
    return out


def _render_plain(classes: list[str], result: GuardResult, i: int, name: str | None) -> dict[str, Any]:
    """One image with the guard off: the model's label, and no verdict (null, never false)."""
    label = int(result.original.labels[i])
    original = {"label": label, "class_name": classes[label], "confidence": float(result.original.confidence[i])}
    return {
        "index": i, "filename": name, **original, "backdoor": None, "score": None, "threshold": None,
        "original": original, "restored": None, "repaired": None, "label_source": "original", "signals": {},
    }  # fmt: skip


@router.post(
    "/classify",
    response_model=ClassifyResponse,  # documents the body; the route builds it directly (see below)
    summary="Classify images and judge whether each carries a backdoor trigger",
    openapi_extra=UPLOAD_BODY,
    responses=responses(*CLASSIFY_ERRORS),
)
async def classify(
    request: Request,
    runtime: RuntimeDep,
    include: Annotated[
        list[Literal["restored"]] | None, Query(description="`restored`: add the de-triggered image (base64 PNG)")
    ] = None,
    x_api_key: ApiKey = None,
) -> Response:
    with runtime.body_budget.hold() as hold:  # the upload's bytes count against the budget until the answer
        try:
            limits = _admit(request, runtime, x_api_key)
            uploads = await read_uploads(request.receive, request.headers["content-type"], limits, hold)
        except ClientGone as err:
            log.info("client %s: %s", request.client.host if request.client else "?", err.message)
            raise
        except GuardError as err:
            # Refused before the body was read to its end: close the connection rather than read the rest of
            # a body we will not use (keep-alive would have to drain it first).
            err.headers = {**(err.headers or {}), "Connection": "close"}
            raise
        return await _answer(runtime, uploads, "restored" in (include or []))


async def _answer(runtime: Runtime, uploads: list[tuple[str | None, bytes]], with_images: bool) -> Response:
    """The verdicts on a request's uploads: decoded, guarded in a batch, rendered."""
    start = time.perf_counter()
    headers = runtime.decoder.headers(uploads)  # cheap, and every file's size is known before any decoding
    with runtime.batcher.admission(len(uploads)):
        images = await runtime.decoder.decode(headers)
        runtime.metrics.decode.observe(time.perf_counter() - start)
        runtime.metrics.queue.set(runtime.batcher.pending)
        result = await runtime.batcher.guard(images)
    counted(runtime, result)
    names = [name for name, _ in uploads]
    manifest = runtime.bundle.manifest
    start = time.perf_counter()
    if with_images:  # PNG-encoding the restorations is real work: off the event loop
        results = await run_in_threadpool(_render, runtime, result, names, with_images)
    else:
        results = _render(runtime, result, names, with_images)
    model = {"name": manifest["name"], "sha256": manifest["files"]["classifier"]["sha256"]}
    guard = "on" if runtime.guarded else "off"
    # Built from typed values above; re-validating through pydantic would cost more than the guard's maths.
    body = orjson.dumps({"model": model, "guard": guard, "results": results})
    runtime.metrics.encode.observe(time.perf_counter() - start)
    return Response(body, media_type="application/json")
