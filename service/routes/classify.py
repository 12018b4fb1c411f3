"""POST /classify: multipart upload of one or more images -> label + backdoor verdict + evidence per image."""

from __future__ import annotations

import hmac
import time
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from service.decode import decode, png_base64
from service.errors import (
    BadImage,
    NoFiles,
    NotReady,
    Overloaded,
    TooLarge,
    TooManyFiles,
    Unauthorized,
    WrongContentType,
    responses,
)
from service.guard import GuardResult
from service.preprocess import to_model_input
from service.runtime import Runtime, RuntimeDep
from service.schemas import ClassifyResponse

router = APIRouter()
INLINE_DECODE_BYTES = 256 << 10  # uploads up to this size are decoded on the event loop

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more images: PNG, JPEG, WebP or BMP, any size and colour mode",
                        }
                    },
                }
            }
        },
    }
}


def _check_key(runtime: Runtime, given: str | None) -> None:
    expected = runtime.settings.api_key
    if expected is not None and not hmac.compare_digest((given or "").encode(), expected.get_secret_value().encode()):
        raise Unauthorized("missing or wrong X-API-Key header")


async def _read_uploads(request: Request, runtime: Runtime) -> list[tuple[str | None, bytes]]:
    s = runtime.settings
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
        raise WrongContentType("send multipart/form-data with one or more file parts named `files`")
    length = int(request.headers.get("content-length") or 0)
    if length > s.max_files * (s.max_file_bytes + 4096):
        raise TooLarge(f"request body of {length} bytes exceeds {s.max_files} files of {s.max_file_bytes} bytes")
    try:
        form = await request.form(max_files=s.max_files + 1, max_fields=s.max_files + 16, max_part_size=1 << 20)
    except MultiPartException as err:
        if "Too many files" in err.message:
            raise TooManyFiles(f"more than {s.max_files} files in one request") from err
        raise BadImage(f"malformed multipart body: {err.message}") from err
    try:
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            raise NoFiles("no file parts named `files` in the request")
        if len(files) > s.max_files:
            raise TooManyFiles(f"{len(files)} files in one request (limit {s.max_files})")
        uploads = []
        for i, f in enumerate(files):
            if f.size is not None and f.size > s.max_file_bytes:
                raise TooLarge(f"file {i} ({f.filename!r}) is {f.size} bytes (limit {s.max_file_bytes})", i)
            uploads.append((f.filename, await f.read()))
        return uploads
    finally:
        await form.close()


def _decode_all(uploads: list[tuple[str | None, bytes]], runtime: Runtime) -> np.ndarray:
    contract = runtime.bundle.preprocessing
    pixels = [decode(data, i, name, contract, runtime.settings.max_pixels) for i, (name, data) in enumerate(uploads)]
    return to_model_input(np.stack(pixels), contract)


def _render(runtime: Runtime, result: GuardResult, names: list[str | None], with_images: bool) -> list[dict[str, Any]]:
    classes = runtime.bundle.class_names
    fusion = runtime.pipeline.fusion
    assert fusion is not None
    labels, confidence = result.labels, result.confidence
    out = []
    for i, name in enumerate(names):
        signals = {}
        for signal in runtime.pipeline.signals:
            evidence = signal.report(result.signals[signal.name], i)
            if "label" in evidence:
                evidence["class_name"] = classes[evidence["label"]]
            evidence["percentile"] = float(
                fusion.percentile(signal.name, result.signals[signal.name].score[i : i + 1])[0]
            )
            signals[signal.name] = evidence
        original, restored = result.original, result.restored
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
                "signals": signals,
            }
        )
    return out


@router.post(
    "/classify",
    response_model=ClassifyResponse,  # documents the body; the route builds it directly (see below)
    summary="Classify images and judge whether each carries a backdoor trigger",
    openapi_extra=UPLOAD_BODY,
    responses=responses(
        BadImage, Unauthorized, TooManyFiles, TooLarge, WrongContentType, NoFiles, NotReady, Overloaded
    ),
)
async def classify(
    request: Request,
    runtime: RuntimeDep,
    include: Annotated[
        list[str] | None, Query(description="`restored`: add the de-triggered image (base64 PNG)")
    ] = None,
    x_api_key: Annotated[str | None, Header(description="required when GUARD_API_KEY is set")] = None,
) -> Response:
    _check_key(runtime, x_api_key)
    if not runtime.ready:
        raise NotReady(runtime.warmup_error or "warming up; retry shortly", headers={"Retry-After": "1"})
    start = time.perf_counter()
    uploads = await _read_uploads(request, runtime)
    if sum(len(data) for _, data in uploads) <= INLINE_DECODE_BYTES:
        images = _decode_all(uploads, runtime)  # small: cheaper than a hop to the thread pool
    else:
        images = await run_in_threadpool(_decode_all, uploads, runtime)
    runtime.metrics.decode.observe(time.perf_counter() - start)
    runtime.metrics.queue.set(runtime.batcher.pending + len(images))
    result = await runtime.batcher.submit(images)
    runtime.metrics.queue.set(runtime.batcher.pending)
    runtime.metrics.observe_result(result)
    names = [name for name, _ in uploads]
    with_images = "restored" in (include or [])
    manifest = runtime.bundle.manifest
    start = time.perf_counter()
    if with_images:  # PNG-encoding the restorations is real work: off the event loop
        results = await run_in_threadpool(_render, runtime, result, names, with_images)
    else:
        results = _render(runtime, result, names, with_images)
    model = {"name": manifest["name"], "sha256": manifest["files"]["classifier"]["sha256"]}
    # Built from typed values above; re-validating through pydantic would cost more than the guard's maths.
    body = orjson.dumps({"model": model, "results": results})
    runtime.metrics.encode.observe(time.perf_counter() - start)
    return Response(body, media_type="application/json")
