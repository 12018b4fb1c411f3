"""Typed errors and their JSON form: {"error": {"code", "message", "file_index"}}, and on the Open Inference
Protocol's routes (/v2...) the protocol's own {"error": "<message>"}, with "code" and "file_index" beside it:
Triton's and KServe's clients read the error as a string (tritonclient cannot even print an object there)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str
    message: str
    file_index: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class OipErrorResponse(BaseModel):
    """An error on the Open Inference Protocol's routes: the protocol's error string, the code beside it."""

    error: str = Field(description="what went wrong (the protocol's error message)")
    code: str = Field(description="the same stable machine-readable code as ErrorBody.code")
    file_index: int | None = Field(None, description="the image the error is about, where it is about one")


def oip_route(request: Request) -> bool:
    """Whether the request is for the Open Inference Protocol's routes, which answer errors in its shape."""
    path = request.url.path
    return path == "/v2" or path.startswith("/v2/")


class GuardError(Exception):
    """An error with an HTTP status and a stable machine-readable code."""

    status = 500
    code = "internal"

    def __init__(self, message: str, file_index: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.file_index, self.headers = message, file_index, headers


class BadImage(GuardError):
    status, code = 400, "bad_image"


class TooManyFiles(GuardError):
    status, code = 413, "too_many_files"


class TooLarge(GuardError):
    status, code = 413, "too_large"


class WrongContentType(GuardError):
    status, code = 415, "unsupported_media_type"


class NoFiles(GuardError):
    status, code = 422, "no_files"


class Unauthorized(GuardError):
    status, code = 401, "unauthorized"


class NotReady(GuardError):
    status, code = 503, "not_ready"


class Overloaded(GuardError):
    status, code = 503, "overloaded"


class UnknownModel(GuardError):
    status, code = 404, "unknown_model"


class GuardFailure(GuardError):
    """A signal could not be computed (a non-finite score): the request fails rather than be judged clean."""

    status, code = 500, "guard_failed"


class MalformedRequest(GuardError):
    status, code = 400, "bad_request"


class RequestTimeout(GuardError):
    status, code = 408, "request_timeout"


class ClientGone(GuardError):
    """The client went away before its request was read: nobody gets this answer, but metrics and logs do.

    499 is nginx's "client closed request": not a server error, so it cannot fire GuardErrorsHigh.
    """

    status, code = 499, "client_disconnected"


def error_response(
    request: Request, status: int, code: str, message: str, file_index: int | None = None, **kw: Any
) -> JSONResponse:
    """The error's JSON in the shape of the route the request was for (module doc)."""
    body: BaseModel
    if oip_route(request):
        body = OipErrorResponse(error=message, code=code, file_index=file_index)
    else:
        body = ErrorResponse(error=ErrorBody(code=code, message=message, file_index=file_index))
    return JSONResponse(body.model_dump(), status_code=status, **kw)


async def guard_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GuardError)
    return error_response(request, exc.status, exc.code, exc.message, exc.file_index, headers=exc.headers)


def responses(*errors: type[GuardError], oip: bool = False) -> dict[int | str, dict[str, object]]:
    """OpenAPI `responses` for a route: every status its errors can produce (oip: an Open Inference Protocol route,
    whose errors take the protocol's shape)."""
    model = OipErrorResponse if oip else ErrorResponse
    out: dict[int | str, dict[str, object]] = {}
    for err in errors:
        entry = out.setdefault(err.status, {"model": model, "description": ""})
        entry["description"] = " / ".join(filter(None, [str(entry["description"]), err.code]))
    return out
