"""POST /v2/models/{name}/infer and GET /v2/models/{name}/ready: the Open Inference Protocol (KServe v2, Triton).

Tensors in, the same guard as /classify out (service.oip): the same micro-batching, queue limit, API key, metrics
and error shape; what differs is only that the images arrive as model input rather than as files to decode.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from service import oip
from service.errors import (
    ClientGone,
    GuardFailure,
    MalformedRequest,
    NotReady,
    Overloaded,
    RequestTimeout,
    TooLarge,
    TooManyFiles,
    Unauthorized,
    UnknownModel,
    WrongContentType,
    responses,
)
from service.routes.classify import ApiKey, admit, counted
from service.routes.health import model_named, oip_outputs
from service.runtime import Runtime, RuntimeDep
from service.upload import BodyHold

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v2/models")
JSON_BYTES_PER_VALUE = 24  # a float32 written out in JSON, with its comma: the body limit's allowance per value
INFER_ERRORS = (
    MalformedRequest, Unauthorized, RequestTimeout, TooManyFiles, TooLarge, WrongContentType, GuardFailure,
    NotReady, Overloaded, UnknownModel,
)  # fmt: skip
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "description": "KServe v2 inference request: one input `images`, FP32 [B, C, H, W] in [0, 1] "
                    "or UINT8; binary tensors after the JSON with the Inference-Header-Content-Length header",
                }
            }
        },
    }
}


# The Inference-Header-Content-Length header
HeaderLength = Annotated[str | None, Header(description="binary tensors: the length of the JSON part of the body")]


def body_limit(runtime: Runtime) -> int:
    """The largest request body: GUARD_MAX_FILES images written out as JSON, and 64 KiB for the rest."""
    return 64 * 1024 + runtime.settings.max_files * math.prod(runtime.bundle.preprocessing.chw) * JSON_BYTES_PER_VALUE


async def read_body(request: Request, limit: int, timeout_s: float, hold: BodyHold) -> bytes:
    """The body, at most `limit` bytes, each counted against the upload budget (`hold`) as it arrives: many slow
    inference requests at once are bounded as /classify's uploads are. Refused mid-body: the connection closes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request body is {declared} bytes; at most {limit}", headers={"Connection": "close"})
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"the request body exceeds {limit} bytes", headers={"Connection": "close"})
                try:
                    hold.take(len(chunk))
                except Overloaded as err:
                    err.headers = {**(err.headers or {}), "Connection": "close"}
                    raise
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s (GUARD_BODY_TIMEOUT_S)") from None
    except ClientDisconnect:
        raise ClientGone("went away while sending its request") from None
    return b"".join(chunks)


@router.get(
    "/{name}/ready", summary="The model is loaded and warmed up (Open Inference Protocol)",
    responses=responses(UnknownModel, NotReady, oip=True),
)  # fmt: skip
async def model_ready(name: str, runtime: RuntimeDep) -> Any:
    model_named(runtime, name)
    if not runtime.ready:
        return JSONResponse({"name": name, "ready": False}, status_code=503)
    return {"name": name, "ready": True}


@router.get(
    "/{name}/versions/{version}/ready",
    summary="The model's one version is loaded and warmed up (as /v2/models/{name}/ready)",
    responses=responses(UnknownModel, NotReady, oip=True),
)
async def model_version_ready(name: str, version: str, runtime: RuntimeDep) -> Any:
    model_named(runtime, name, version)
    return await model_ready(name, runtime)


@dataclass(frozen=True)
class InferCall:
    """What an inference request brings besides the model's name (and version): one dependency for both routes."""

    request: Request
    runtime: Runtime
    api_key: str | None
    header_length: str | None  # Inference-Header-Content-Length: binary tensors follow the JSON


async def infer_call(
    request: Request,
    runtime: RuntimeDep,
    x_api_key: ApiKey = None,
    inference_header_content_length: HeaderLength = None,
) -> InferCall:
    return InferCall(request, runtime, x_api_key, inference_header_content_length)


InferCallDep = Annotated[InferCall, Depends(infer_call)]


@router.post(
    "/{name}/infer",
    summary="Guard a batch of images sent as a tensor (Open Inference Protocol, JSON or binary tensors)",
    openapi_extra=INFER_BODY,
    responses=responses(*INFER_ERRORS, oip=True),
)
async def infer(name: str, call: InferCallDep) -> Response:
    return await _infer(call, name)


@router.post(
    "/{name}/versions/{version}/infer",
    summary="Guard a batch of images with the model's one version (as /v2/models/{name}/infer)",
    openapi_extra=INFER_BODY,
    responses=responses(*INFER_ERRORS, oip=True),
)
async def infer_version(name: str, version: str, call: InferCallDep) -> Response:
    return await _infer(call, name, version)


async def _infer(call: InferCall, name: str, version: str | None = None) -> Response:
    request, runtime = call.request, call.runtime
    admit(runtime, call.api_key)  # the key first: an unknown name or version tells nothing unauthorised
    model = model_named(runtime, name, version)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise WrongContentType(f"Content-Encoding {encoding!r}: send the request uncompressed")
    with runtime.body_budget.hold() as hold:  # the body's bytes count against the budget until the answer
        body = await read_body(request, body_limit(runtime), runtime.settings.body_timeout_s, hold)
        head, binary = oip.split_body(body, call.header_length)
        known = oip_outputs(runtime)
        parsed = oip.parse_request(head, binary, runtime.bundle.preprocessing, runtime.settings.max_files, known)
        with runtime.batcher.admission(len(parsed.images)):
            runtime.metrics.queue.set(runtime.batcher.pending)
            result = await runtime.batcher.guard(parsed.images)
    counted(runtime, result)
    content, json_length = oip.encode_response(model, parsed, result, runtime.guarded)
    headers = {"Inference-Header-Content-Length": str(json_length)} if json_length is not None else None
    media = "application/octet-stream" if json_length is not None else "application/json"
    return Response(content, media_type=media, headers=headers)
